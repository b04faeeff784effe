"""The sampler table's figure: each metric against model evaluations (log x), one line per sampler.

Drawn with PIL (matplotlib is not a dependency of dit_fast); matplotlib is used when installed.
"""
from __future__ import annotations

import math
from pathlib import Path

COLORS = {"ddpm": (31, 119, 180), "ddim": (255, 127, 14), "dpm-solver++": (44, 160, 44),
          "unipc": (214, 39, 40), "euler": (148, 103, 189), "heun": (140, 86, 75)}
PANEL_W, PANEL_H, MARGIN = 460, 340, 58


def _panels(speed_metric):
    if speed_metric:
        return [speed_metric]
    return [("accuracy", "class accuracy (higher is better)"),
            ("frechet_distance", "Fréchet distance (lower is better)")]


def _series(rows):
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["sampler"], []).append(r)
    return {name: sorted(rs, key=lambda r: r["nfe"]) for name, rs in by_name.items()}


def save_plot(rows: list[dict], meta: dict, path: Path, speed_metric=None) -> Path:
    """Write the PNG at ``path`` (atomically); returns it."""
    from dit_fast.atomic import atomic_write

    try:
        import matplotlib  # noqa: F401
        draw = _matplotlib
    except ImportError:
        draw = _pil
    return atomic_write(path, lambda f: draw(rows, meta, f, _panels(speed_metric)))


def _matplotlib(rows, meta, f, panels) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name, rs in _series(rows).items():
            color = [c / 255 for c in COLORS.get(name, (0, 0, 0))]
            ax.plot([r["nfe"] for r in rs], [r[key] for r in rs], "o-", color=color, label=name)
        if key == "accuracy":
            ax.set_ylim(min(0.9, min(r[key] for r in rows)) - 0.005, 1.005)
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{meta['model']} - {meta['device']} - {meta['date'][:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(f, dpi=120, format="png")


def _pil(rows, meta, f, panels) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (PANEL_W * len(panels), PANEL_H + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), f"{meta['model']} | {meta['device']} | {meta['date']}", fill="black")
    nfes = [r["nfe"] for r in rows]
    xlim = (math.log10(max(1, min(nfes)) / 1.5), math.log10(max(nfes) * 1.5))
    for i, (key, title) in enumerate(panels):
        values = [r[key] for r in rows]
        low, high = min(values), max(values)
        if key == "accuracy":  # a saturated accuracy would otherwise fill the panel with 0.2% steps
            low, high = min(low, 0.9), 1.0
        pad = 0.08 * (high - low or 1.0)
        box = (i * PANEL_W + MARGIN, 30 + 24, (i + 1) * PANEL_W - 14, 30 + PANEL_H - 40)
        _axes(draw, box, xlim, (low - pad, high + pad), title)
        for j, (name, rs) in enumerate(_series(rows).items()):
            pts = [_xy(box, xlim, (low - pad, high + pad), math.log10(r["nfe"]), r[key]) for r in rs]
            color = COLORS.get(name, (0, 0, 0))
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
            if i == 0:
                draw.text((box[2] - 90, box[1] + 4 + 12 * j), f"- {name}", fill=color)
    image.save(f, format="PNG")


def _xy(box, xlim, ylim, x, y):
    x0, y0, x1, y1 = box
    return (x0 + (x - xlim[0]) / (xlim[1] - xlim[0]) * (x1 - x0),
            y1 - (y - ylim[0]) / (ylim[1] - ylim[0]) * (y1 - y0))


def _axes(draw, box, xlim, ylim, title) -> None:
    """Frame, title, log-x ticks at 1-2-5 decades and five y ticks."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    # PIL's built-in bitmap font is ASCII only.
    draw.text((x0, y0 - 16), title.encode("ascii", "replace").decode().replace("?", "e"), fill="black")
    draw.text(((x0 + x1) / 2 - 70, y1 + 20), "model evaluations (NFE, log)", fill="black")
    for decade in range(0, 4):
        for m in (1, 2, 5):
            v = m * 10 ** decade
            if xlim[0] <= math.log10(v) <= xlim[1]:
                x, _ = _xy(box, xlim, ylim, math.log10(v), ylim[0])
                draw.line((x, y1, x, y1 + 4), fill="black")
                draw.line((x, y0, x, y1), fill=(230, 230, 230))
                draw.text((x - 6, y1 + 6), str(v), fill="black")
    for k in range(5):
        v = ylim[0] + k * (ylim[1] - ylim[0]) / 4
        _, y = _xy(box, xlim, ylim, xlim[0], v)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((x0 - MARGIN + 4, y - 6), f"{v:.4g}", fill="black")
