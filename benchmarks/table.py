"""The training speed / memory table: fast-DiT's three switches, then each of our speed-ups, measured now.

    python benchmarks/table.py                       # CUDA: DiT-XL/2, 256 px, batch 128; CPU: a tiny DiT
    python benchmarks/table.py --rows baseline,ckpt,ckpt_mp_feat --steps 3 --out /tmp/table

Rows (``--rows`` picks a subset, in this order): fast-DiT's (gradient checkpointing, mixed precision,
feature pre-extraction) = no/no/no (this is the baseline: the original code path, i.e. unfused "math"
attention, separate LayerNorm/modulate ops, fp32 = TF32 on a GPU, VAE on the fly), yes/no/no,
yes/yes/no, yes/yes/yes; then yes/yes/yes plus ONE speed-up each (Triton fused adaLN, SDPA attention,
Triton attention, torch.compile, DeepSpeed ZeRO-2 in one process); then all speed-ups that ran here
(with and without checkpointing). Every row gets a ratio against the baseline measured in the same run
(if the baseline runs out of memory, as fast-DiT's did, against yes/no/no, and the table says so).

The VAE of the "VAE on the fly" rows is a randomly initialised diffusers AutoencoderKL with the SD VAE
config (the same compute as the real one; weights do not matter for timing, and none can be downloaded
here); the tiny CPU model uses a tiny AutoencoderKL. Results: a markdown table on stdout and
JSON + CSV + markdown under benchmarks/results/ (or --out), naming device, versions, commit and date.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (HERE, ROOT / "kernels", ROOT):  # runnable from a fresh clone without `pip install -e .`
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Triton reads TRITON_INTERPRET when it is first imported, and torch.utils.flop_counter imports it.
if "--triton-interpret" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import report  # noqa: E402
from flops import PeakTable, forward_flops_per_image, mfu, train_flops_per_image  # noqa: E402
from train_step import BenchSetup, RowConfig, build_state, free_state, measure  # noqa: E402

_FEAT = dict(grad_ckpt=True, mixed_precision=True, pre_extracted=True)
ROWS: tuple[RowConfig, ...] = (
    RowConfig("baseline", "baseline: original code path (fast-DiT no/no/no)"),
    RowConfig("ckpt", "fast-DiT: grad ckpt", grad_ckpt=True),
    RowConfig("ckpt_mp", "fast-DiT: grad ckpt + mixed precision", grad_ckpt=True, mixed_precision=True),
    RowConfig("ckpt_mp_feat", "fast-DiT: grad ckpt + mixed precision + pre-extracted features", **_FEAT),
    RowConfig("fused_adaln", "+ Triton fused adaLN", fused_adaln=True, **_FEAT),
    RowConfig("sdpa", "+ attention sdpa", attn_backend="sdpa", **_FEAT),
    RowConfig("triton_attn", "+ attention triton", attn_backend="triton", **_FEAT),
    RowConfig("compile", "+ torch.compile", compile=True, **_FEAT),
    RowConfig("zero2", "+ DeepSpeed ZeRO-2 (1 process)", zero_stage=2, **_FEAT),
    RowConfig("all", "all speed-ups", **_FEAT),              # filled in by combine_speedups
    RowConfig("all_no_ckpt", "all speed-ups, no grad ckpt", **_FEAT),
)
ROW_KEYS = tuple(r.key for r in ROWS)
TINY = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2)  # the CPU default model
SD_VAE_CONFIG = dict(  # Stable Diffusion's VAE (sd-vae-ft-ema/-mse): same architecture, random weights
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=256)
TINY_VAE_CONFIG = dict(  # two levels: downsample 2, 4 latent channels
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=16)


# ------------------------------------------------------------------------------------------ setup

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    p.add_argument("--model", default=None, help="a DiT_models name or 'tiny' (default: DiT-XL/2 on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default: 256; 32 for tiny)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 5 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2)")
    p.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(ROW_KEYS)} (ratios need baseline or ckpt)")
    p.add_argument("--mp-dtype", choices=("bf16", "fp16"), default="bf16",
                   help="mixed precision: bf16 autocast, or fp16 autocast with a GradScaler")
    p.add_argument("--compile-mode", choices=("block", "model"), default="block",
                   help="torch.compile each DiT block (default) or the whole model")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop starting new rows after this many seconds (they are marked skipped)")
    p.add_argument("--triton-interpret", action="store_true",
                   help="on a CPU, run the Triton rows in Triton's interpreter (sets TRITON_INTERPRET=1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the tiny model on a CPU, where more threads only "
                        "add overhead and noise; torch's default otherwise)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON / CSV / markdown files")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def select_rows(spec: str) -> list[RowConfig]:
    """Rows named in ``spec`` ("all" = every row), in table order; unknown names raise."""
    if spec.strip() == "all":
        return list(ROWS)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in ROW_KEYS]
    if unknown or not wanted:
        raise SystemExit(f"--rows: unknown row(s) {unknown or spec!r}; choose from: {', '.join(ROW_KEYS)} "
                         f"(or 'all')")
    return [r for r in ROWS if r.key in wanted]


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults (GPU: DiT-XL/2 at batch 128; CPU: tiny model, batch 8)."""
    if args.triton_interpret and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--triton-interpret must be seen before triton is imported: pass it on the command "
                         "line of benchmarks/table.py, or set TRITON_INTERPRET=1 in the environment")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu")
    gpu = args.device.type == "cuda"
    args.model = args.model or ("DiT-XL/2" if gpu else "tiny")
    args.batch = args.batch or (128 if gpu else 8)
    args.image_size = args.image_size or (32 if args.model == "tiny" else 256)
    args.steps = args.steps if args.steps is not None else (5 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else 2
    if args.threads is None and not gpu and args.model == "tiny":
        args.threads = 1
    for name in ("batch", "image_size", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def make_setup(args: argparse.Namespace) -> BenchSetup:
    from dit_fast.models import DiT, DiT_models
    from dit_fast.vae import downsample_of
    if args.model == "tiny":
        vae_config, kind = TINY_VAE_CONFIG, "tiny"
    elif args.model in DiT_models:
        vae_config, kind = SD_VAE_CONFIG, "SD"
    else:
        raise SystemExit(f"--model {args.model!r}: choose 'tiny' or one of {', '.join(DiT_models)}")
    downsample = downsample_of(vae_config["block_out_channels"])
    if args.image_size % downsample:
        raise SystemExit(f"--image-size {args.image_size} is not divisible by the {kind} VAE's "
                         f"downsampling factor {downsample}")
    latent = args.image_size // downsample

    def build_model(**kwargs):
        kwargs.update(input_size=latent, num_classes=args.num_classes)
        if args.model == "tiny":
            return DiT(**TINY, **kwargs)
        return DiT_models[args.model](**kwargs)

    def build_vae():
        from diffusers import AutoencoderKL

        from dit_fast.vae import VAE
        return VAE(AutoencoderKL(**vae_config))

    setup = BenchSetup(build_model=build_model, batch=args.batch, image_size=args.image_size,
                       latent_size=latent, build_vae=build_vae, device=args.device,
                       mp_dtype=torch.bfloat16 if args.mp_dtype == "bf16" else torch.float16,
                       compile_mode=args.compile_mode, num_classes=args.num_classes, seed=args.seed)
    setup.vae_note = (f"VAE on the fly: randomly initialised diffusers AutoencoderKL with the {kind} VAE "
                      f"config (block_out_channels {vae_config['block_out_channels']}; same compute as "
                      f"the real weights, which do not matter for timing), fp32, latents sampled")
    return setup


# ------------------------------------------------------------------------------------------ rows

def unavailable_reason(row: RowConfig, device: torch.device) -> str | None:
    """Why a row cannot run here (checked before building anything), or None."""
    from dit_fast import dispatch
    if not row.pre_extracted and importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed (the VAE-on-the-fly rows need it: pip install diffusers)"
    if row.zero_stage and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    ok, why = dispatch.attn_backend_status(row.attn_backend, device)
    if not ok:
        return f"attention backend {row.attn_backend!r} unavailable: {why}"
    if row.fused_adaln:
        from dit_fast_kernels import triton_status
        ok, why = triton_status(device)
        if not ok:
            return f"fused adaLN unavailable: {why}"
    return None


def combine_speedups(row: RowConfig, results: list[dict], device: torch.device) -> RowConfig:
    """The 'all' rows: every single-speed-up row that ran here, the faster attention of sdpa/triton.

    A speed-up whose own row was not run this time is used if it is available on this device.
    ZeRO is left out: on one GPU it partitions nothing and only adds its engine's overhead.
    """
    by_key = {r["key"]: r for r in results}

    def works(key: str, fallback: bool) -> bool:
        return by_key[key]["status"] == "ok" if key in by_key else fallback

    from dit_fast import dispatch
    fused_row = next(r for r in ROWS if r.key == "fused_adaln")
    fused = works("fused_adaln", unavailable_reason(fused_row, device) is None)
    attn = {b: by_key[k]["steps_per_s"] for b, k in (("sdpa", "sdpa"), ("triton", "triton_attn"))
            if k in by_key and by_key[k]["status"] == "ok"}
    backend = max(attn, key=attn.get) if attn else ("sdpa" if dispatch.attn_backend_status("sdpa", device)[0]
                                                    else "math")
    compiled = works("compile", True)
    parts = [p for p, on in (("fused adaLN", fused), (f"attention {backend}", True), ("compile", compiled)) if on]
    ckpt = row.key == "all"
    label = f"{'all speed-ups' if ckpt else 'all speed-ups, no grad ckpt'}: {' + '.join(parts)}"
    return dataclasses.replace(row, label=label, fused_adaln=fused, attn_backend=backend, compile=compiled,
                               grad_ckpt=ckpt)


def run_row(row: RowConfig, setup: BenchSetup, args) -> dict:
    """Measure one row in a fresh state; failures become a status, never an exception."""
    result = {"key": row.key, "label": row.label, **{f.name: getattr(row, f.name)
              for f in dataclasses.fields(row) if f.name not in ("key", "label")}, "status": "ok"}
    reason = unavailable_reason(row, setup.device)
    if reason:
        result["status"] = f"skipped: {reason}"
        return result
    state = None
    free_state(None)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    try:
        state = build_state(row, setup)
        result.update(measure(state, setup.device, args.steps, args.warmup))
    except torch.cuda.OutOfMemoryError:
        result["status"] = "OOM"
    except Exception as err:  # one row's failure must not lose the others
        message = " ".join(str(err).split())[:300]
        skip = isinstance(err, ImportError) or "was asked for but" in message
        result["status"] = f"{'skipped' if skip else 'error'}: {type(err).__name__}: {message}"
    finally:
        free_state(state)
        state = None
    return result


def add_rates(result: dict, setup: BenchSetup, flops_per_image: int, peaks) -> None:
    """steps/s, images/s, MB and MFU (against the row's precision peak) for a measured row."""
    if result["status"] != "ok":
        return
    result["steps_per_s"] = 1.0 / result["mean_step_s"]
    result["images_per_s"] = setup.batch * result["steps_per_s"]
    result["peak_mb"] = result["peak_bytes"] / 2 ** 20
    if "peak_reserved_bytes" in result:
        result["peak_reserved_mb"] = result["peak_reserved_bytes"] / 2 ** 20
    peak = peaks.peak(result["mixed_precision"])
    result["mfu"] = mfu(result["images_per_s"], flops_per_image, peak)
    result["mfu_peak"] = peak.source


def add_ratios(results: list[dict]) -> str | None:
    """Ratio of steps/s against the baseline (or, if it did not run, fast-DiT's yes/no/no row)."""
    ok = {r["key"]: r for r in results if r["status"] == "ok"}
    ref_key = next((k for k in ("baseline", "ckpt") if k in ok), None)
    for r in results:
        r["ratio"] = r["steps_per_s"] / ok[ref_key]["steps_per_s"] if ref_key and r["status"] == "ok" else None
    return ref_key


def run_table(args: argparse.Namespace, progress: bool = True) -> tuple[list[dict], dict]:
    """Measure the selected rows; returns (rows, metadata). Results are written after every row."""
    rows = select_rows(args.rows)
    setup = make_setup(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_rows(args, rows, setup, progress)
    finally:
        torch.set_num_threads(threads)


def _run_rows(args, rows: list[RowConfig], setup: BenchSetup, progress: bool) -> tuple[list[dict], dict]:
    if setup.device.type == "cuda":  # fp32 rows run as the original train.py: TF32 matmuls and convs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    flops_fwd = forward_flops_per_image(lambda: setup.build_model(attn_backend="math"), setup.latent_size)
    peaks = PeakTable(setup.device)
    meta = report.metadata(args, setup, flops_fwd, train_flops_per_image(flops_fwd), peaks.info())
    results: list[dict] = []
    start = time.perf_counter()
    bar = _progress(rows, progress)
    for row in bar:
        if row.key.startswith("all"):
            row = combine_speedups(row, results, setup.device)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(row.key)
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            result = {"key": row.key, "label": row.label, "status": f"skipped: time budget "
                      f"(--max-seconds {args.max_seconds:g}) used up", **dataclasses.asdict(row)}
        else:
            result = run_row(row, setup, args)
        add_rates(result, setup, meta["train_flops_per_image"], peaks)
        results.append(result)
        meta["reference_row"] = add_ratios(results)
        meta["elapsed_s"] = round(time.perf_counter() - start, 1)
        report.write_all(results, meta, Path(args.out))
    return results, meta


def _progress(rows, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return rows
    return tqdm(rows, desc="table rows", unit="row", disable=not enabled, file=sys.stderr)


def main(argv=None) -> int:
    """Run the table with the command-line options; print it and write the result files."""
    args = resolve_defaults(parse_args(argv))
    results, meta = run_table(args)
    print(report.markdown(results, meta))
    paths = report.write_all(results, meta, Path(args.out))
    print("\nwritten: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
