"""Writing the training table: run metadata (device, versions, commit, date), markdown, CSV and JSON."""
from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CSV_FIELDS = ("key", "label", "grad_ckpt", "precision", "pre_extracted", "attn_backend", "fused_adaln", "compile",
              "zero_stage", "status", "steps_per_s", "images_per_s", "peak_mb", "peak_reserved_mb", "mfu", "ratio",
              "ratio_sdpa", "mean_step_s", "warmup_s", "last_loss", "mfu_peak", "command")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """HEAD's hash (+ '-dirty' with uncommitted tracked changes); 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DIT_FAST_COMMIT", "unknown (no git checkout)")


def cpu_model() -> str:
    """'<model name> (<n> cores visible)' from /proc/cpuinfo, or platform's guess elsewhere."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB)"
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """'cpu' or the GPU name as a file-name part, e.g. 'h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def metadata(args, latent_size: int, forward_flops: int, train_flops: int, peak_info: dict, vae_note: str) -> dict:
    """Everything a reader needs to know where the numbers come from."""
    now = dt.datetime.now(dt.timezone.utc)
    cuda = args.device.type == "cuda"
    memory = ("peak allocated = torch.cuda.max_memory_allocated, peak reserved = torch.cuda.max_memory_reserved, "
              "after reset_peak_memory_stats, per row from a fresh state (weights, fp32 master weights, grads, "
              "AdamW state, EMA and VAE included)"
              if cuda else
              "CPU, no allocator statistic: peak live tensor bytes (LiveBytes) over one extra step = every tensor "
              "of the row's state at the step's start (weights, fp32 master, AdamW state, EMA, VAE, data) + every "
              "storage aten ops create during the step (TorchDispatchMode), minus each storage when it is "
              "freed; deterministic, sees checkpointing's recomputation")
    return {
        "date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%H:%M:%S"),
        "device": device_name(args.device), "device_type": args.device.type,
        "slug": device_slug(args.device), "git_commit": _git_commit(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "deepspeed": _version("deepspeed"), "diffusers": _version("diffusers"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "model": args.model, "batch": args.batch, "image_size": args.image_size,
        "latent_size": latent_size, "steps": args.steps, "warmup": args.warmup,
        "mixed_precision": f"train.py --precision {args.mp_dtype}: DeepSpeed's {args.mp_dtype} engine ({args.mp_dtype} "
                           "weights and activations, fp32 master weights and AdamW state"
                           + (", dynamic loss scaling)" if args.mp_dtype == "fp16" else ")"),
        "fp32": "TF32 matmuls/convs on CUDA (as DiT's train.py; build_engine sets it)" if cuda else "fp32",
        "forward_flops_per_image": forward_flops, "train_flops_per_image": train_flops,
        "flops_note": "FlopCounterMode on one forward (meta device) x3 per training image; recompute and "
                      "VAE not counted",
        "peaks": peak_info,
        "mfu_note": ("MFU against the GPU's dense spec peak (bf16/fp16 rows: bf16, fp32 rows: TF32); the "
                     "measured bf16 matmul peak is listed for comparison" if cuda else
                     "MFU against an fp32 matmul peak measured in this run (all rows)"),
        "memory_method": memory, "vae_note": vae_note,
        "step": "train.py's step: dit_fast.train.step.TrainStep.optimizer_step over the engine that "
                "dit_fast.train.engine.build_engine builds from the row's flags (VAE encode for the rows "
                "without pre-extraction, diffusion.training_losses with random t, engine.backward, "
                "engine.step = fused AdamW lr 1e-4 wd 0, fp32 EMA 0.9999 of the fp32 master weights); "
                "timed with perf_counter, synchronized per step on CUDA; mean over the timed steps",
    }


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _yes(flag) -> str:
    return "yes" if flag else "no"


def markdown(results: list[dict], meta: dict) -> str:
    """The table as markdown, with the run's provenance above it and each row's train.py command below."""
    refs = meta.get("reference_rows", {})
    ref = {"original_math": "the original code path (math attention)", "ckpt": "fast-DiT's grad-ckpt row (the "
           "math baseline did not run: see its status)"}.get(refs.get("ratio"), "nothing (no baseline ran)")
    cuda = meta["device_type"] == "cuda"
    mem_head = "peak alloc (MB) | peak reserved (MB)" if cuda else "peak live tensors, CPU (MB)"
    lines = [
        f"## Training speed and memory through train.py's step: {meta['model']}, {meta['image_size']} px "
        f"(latent {meta['latent_size']}), batch {meta['batch']}",
        "",
        f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, deepspeed "
        f"{meta['deepspeed']}, diffusers {meta['diffusers']}; commit {meta['git_commit']}; "
        f"{meta['date']} {meta['time_utc']} UTC; {meta['steps']} timed steps after {meta['warmup']} warm-up",
        f"step: {meta['step']}.",
        f"ratios: steps/s against {ref} (vs math) and against original + SDPA (vs SDPA). MFU: "
        f"{meta['mfu_note']}; model FLOPs {meta['train_flops_per_image'] / 1e9:.4g} GFLOP per training image "
        f"({meta['flops_note']}).",
        f"memory: {meta['memory_method']}.",
        f"mixed precision: {meta['mixed_precision']}; fp32: {meta['fp32']}. {meta['vae_note']}.",
        "",
        "| row | grad ckpt | precision | features | attention | adaLN | compile | ZeRO | steps/s | images/s "
        f"| {mem_head} | MFU | vs math | vs SDPA | status |",
        "|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|--:|--:|--:|" + ("--:|" if cuda else "") + "--:|--:|--:|---|",
    ]
    for r in results:
        mem = _fmt_mb(r.get("peak_mb")) + (f" | {_fmt_mb(r.get('peak_reserved_mb'))}" if cuda else "")
        lines.append(
            f"| {r['label']} | {r.get('grad_ckpt', '-')} | {r.get('precision', '-')} "
            f"| {_yes(r.get('pre_extracted'))} | {r.get('attn_backend', '-')} "
            f"| {'triton' if r.get('fused_adaln') else 'torch'} | {_yes(r.get('compile'))} "
            f"| {r.get('zero_stage') or '-'} | {_fmt(r.get('steps_per_s'), '.3f')} "
            f"| {_fmt(r.get('images_per_s'), '.1f')} | {mem} "
            f"| {_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.2f', '%')} "
            f"| {_fmt(r.get('ratio'), '.2f', 'x')} | {_fmt(r.get('ratio_sdpa'), '.2f', 'x')} | {_status(r)} |")
        if r.get("encoder_s") is not None:
            lines.append(encoder_line(r, cuda))
    lines += ["", "train.py command of each row (data paths are placeholders):", ""]
    lines += [f"- {r['key']}: `{r['command']}`" for r in results if r.get("command")]
    return "\n".join(lines)


def encoder_line(r: dict, cuda: bool) -> str:
    """The REPA row's frozen encoder as its own line: its forward's time per step and share of the step."""
    blanks = "| - " * (7 if cuda else 6)
    return (f"| ↳ of which the frozen encoder's forward (no grad{', bf16 autocast' if cuda else ''}) | - | - | - | - "
            f"| - | - | - {blanks}| {1e3 * r['encoder_s']:.2f} ms/step = {100 * r['encoder_share']:.1f}% of the step; "
            f"weights {_fmt_mb(r['encoder_weights_mb'])} MB, forward peak {_fmt_mb(r['encoder_forward_peak_mb'])} MB |")


def _status(r: dict) -> str:
    """The row's status; a measured row whose last loss is NaN/inf says so (it was timed anyway)."""
    loss = r.get("last_loss")
    if r["status"] == "ok" and loss is not None and not math.isfinite(loss):
        return f"ok, but the last loss is {loss}"
    return r["status"]


def _fmt_mb(value) -> str:
    return _fmt(value, ",.1f" if (value or 1e9) < 100 else ",.0f")


def write_all(results: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    """JSON (everything), CSV (one line per row) and markdown, named table-<device>-<date>.*."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"table-{meta['slug']}-{meta['date']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".md")]
    _atomic_write(paths[0], json.dumps({"meta": meta, "rows": results}, indent=1, default=str))
    buffer = io.StringIO()
    buffer.write(f"# {meta['device']}; torch {meta['torch']}; commit {meta['git_commit']}; {meta['date']}; "
                 f"{meta['model']} batch {meta['batch']} steps {meta['steps']}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in results:
        writer.writerow(["" if r.get(f) is None else f"{r[f]:.6g}" if isinstance(r[f], float) else r[f]
                         for f in CSV_FIELDS])
    _atomic_write(paths[1], buffer.getvalue())
    _atomic_write(paths[2], markdown(results, meta) + "\n")
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
