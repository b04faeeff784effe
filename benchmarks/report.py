"""Writing the training table: run metadata (device, versions, commit, date), markdown, CSV and JSON."""
from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import io
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CSV_FIELDS = ("key", "label", "grad_ckpt", "mixed_precision", "pre_extracted", "attn_backend", "fused_adaln",
              "compile", "zero_stage", "status", "steps_per_s", "images_per_s", "peak_mb", "peak_reserved_mb",
              "mfu", "ratio", "mean_step_s", "warmup_s", "mfu_peak")


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


def metadata(args, setup, forward_flops: int, train_flops: int, peak_info: dict) -> dict:
    """Everything a reader needs to know where the numbers come from."""
    now = dt.datetime.now(dt.timezone.utc)
    memory = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, per row from a fresh state "
              "(weights, grads, AdamW state, EMA and VAE included); reserved in the JSON/CSV"
              if setup.device.type == "cuda" else
              "CPU has no allocator statistic: peak live tensor bytes over one extra step = every tensor "
              "of the row's state at the step's start (weights, AdamW state, EMA, VAE, data) + every "
              "storage aten ops create during the step (TorchDispatchMode), minus each storage when it "
              "is freed; deterministic, sees checkpointing's recomputation")
    return {
        "date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%H:%M:%S"),
        "device": device_name(setup.device), "device_type": setup.device.type,
        "slug": device_slug(setup.device), "git_commit": _git_commit(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "deepspeed": _version("deepspeed"), "diffusers": _version("diffusers"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "model": args.model, "batch": args.batch, "image_size": args.image_size,
        "latent_size": setup.latent_size, "steps": args.steps, "warmup": args.warmup,
        "mixed_precision": f"{args.mp_dtype} autocast on the model forward"
                           + (" + GradScaler" if args.mp_dtype == "fp16" else ""),
        "fp32": "TF32 matmuls/convs on CUDA (as DiT's train.py)" if setup.device.type == "cuda" else "fp32",
        "compile_mode": args.compile_mode,
        "forward_flops_per_image": forward_flops, "train_flops_per_image": train_flops,
        "flops_note": "FlopCounterMode on one forward (meta device) x3 per training image; recompute and "
                      "VAE not counted",
        "peaks": peak_info,
        "mfu_note": ("MFU against the GPU's dense spec peak (bf16 rows: bf16, fp32 rows: TF32); the "
                     "measured bf16 matmul peak is listed for comparison" if setup.device.type == "cuda" else
                     "MFU against an fp32 matmul peak measured in this run (all rows)"),
        "memory_method": memory, "vae_note": setup.vae_note,
        "step": "VAE encode (rows without pre-extraction) + diffusion.training_losses (random t, labels) + "
                "backward + AdamW(lr 1e-4, wd 0) + EMA(0.9999, fp32); timed with perf_counter, "
                "synchronized per step on CUDA; mean over the timed steps",
    }


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _yes(flag) -> str:
    return "yes" if flag else "no"


def markdown(results: list[dict], meta: dict) -> str:
    """The table as markdown, with the run's provenance above it."""
    ref = {"baseline": "the baseline row", "ckpt": "fast-DiT yes/no/no (the baseline did not run: see its "
           "status)"}.get(meta.get("reference_row"), "nothing (neither the baseline nor yes/no/no ran)")
    mem_head = "peak memory (MB)" if meta["device_type"] == "cuda" else "peak live tensors (MB)"
    lines = [
        f"## Training speed and memory: {meta['model']}, {meta['image_size']} px (latent "
        f"{meta['latent_size']}), batch {meta['batch']}",
        "",
        f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, deepspeed "
        f"{meta['deepspeed']}, diffusers {meta['diffusers']}; commit {meta['git_commit']}; "
        f"{meta['date']} {meta['time_utc']} UTC; {meta['steps']} timed steps after {meta['warmup']} warm-up",
        f"ratio: steps/s against {ref}. MFU: {meta['mfu_note']}; model FLOPs "
        f"{meta['train_flops_per_image'] / 1e9:.4g} GFLOP per training image ({meta['flops_note']}).",
        f"memory: {meta['memory_method']}.",
        f"mixed precision: {meta['mixed_precision']}; fp32: {meta['fp32']}. {meta['vae_note']}.",
        "",
        "| row | grad ckpt | mixed precision | feature pre-extraction | attention | adaLN | compile | ZeRO "
        f"| steps/s | images/s | {mem_head} | MFU | vs baseline | status |",
        "|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {_yes(r.get('grad_ckpt'))} | {_yes(r.get('mixed_precision'))} "
            f"| {_yes(r.get('pre_extracted'))} | {r.get('attn_backend', '-')} "
            f"| {'triton' if r.get('fused_adaln') else 'torch'} | {_yes(r.get('compile'))} "
            f"| {r.get('zero_stage') or '-'} | {_fmt(r.get('steps_per_s'), '.3f')} "
            f"| {_fmt(r.get('images_per_s'), '.1f')} | {_fmt(r.get('peak_mb'), ',.1f' if (r.get('peak_mb') or 1e9) < 100 else ',.0f')} "
            f"| {_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.2f', '%')} "
            f"| {_fmt(r.get('ratio'), '.2f', 'x')} | {r['status']} |")
    return "\n".join(lines)


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
