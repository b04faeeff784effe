"""The training speed / memory table, every row through train.py's own step, measured now.

    python benchmarks/table.py                       # CUDA: DiT-XL/2, 256 px, batch 128; CPU: a tiny DiT
    python benchmarks/table.py --rows original_math,ckpt,ckpt_mp_feat --steps 3 --out /tmp/table

Each row is a train.py command line (printed with the results): its flags -> Config -> the DeepSpeed
engine, fused AdamW and fp32 master-weight EMA that train.py builds -> the trainer's step
(dit_fast/train/step.py), timed for a few steps on synthetic latents (pre-extracted features) or images
(VAE on the fly). Mixed precision is what train.py does: ``--precision bf16``, DeepSpeed's bf16 engine
(bf16 weights and activations, fp32 master weights and AdamW state); fp32 rows use TF32 on a GPU.

Rows (``--rows`` picks a subset, in the order given): two baselines, the original DiT's code path with
the attention of timm < 0.9 (unfused "math") and of timm >= 0.9 (SDPA), both fp32 with the VAE on the
fly; fast-DiT's three switches (gradient checkpointing, mixed precision, feature pre-extraction) on
train.py's defaults (SDPA attention); then each of our speed-ups on top of ckpt + bf16 + features;
then the compiled rows without / with full / with selective checkpointing, each with inductor's adaLN
and with the fused Triton adaLN ops. Ratios are against both baselines measured in the same run (if the
math baseline cannot run, against fast-DiT's grad-ckpt row, and the table says so).

The VAE of the "VAE on the fly" rows is a randomly initialised diffusers AutoencoderKL with the SD VAE
config (the same compute as the real one; weights do not matter for timing, and none can be downloaded
here); the tiny CPU model uses a tiny AutoencoderKL. Results: a markdown table on stdout and
JSON + CSV + markdown under benchmarks/results/ (or --out), naming device, versions, commit and date.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import tempfile
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
from train_step import RowConfig, build_state, free_state, measure  # noqa: E402

_CKPT_MP = ("--precision", "bf16", "--grad-checkpointing")
_SEL_MP = ("--precision", "bf16", "--grad-checkpointing", "selective")
_MP = ("--precision", "bf16")
_ZERO2 = ("--deepspeed_config", str(Path("configs") / "deepspeed" / "zero2.json"))
ROWS: tuple[RowConfig, ...] = (
    RowConfig("original_math", "original code path: math attention (as timm < 0.9), fp32",
              ("--precision", "fp32", "--attn-backend", "math"), pre_extracted=False),
    RowConfig("original_sdpa", "original + SDPA attention (as timm >= 0.9), fp32",
              ("--precision", "fp32", "--attn-backend", "sdpa"), pre_extracted=False),
    RowConfig("ckpt", "fast-DiT: grad ckpt", ("--precision", "fp32", "--grad-checkpointing"), pre_extracted=False),
    RowConfig("ckpt_mp", "fast-DiT: grad ckpt + mixed precision", _CKPT_MP, pre_extracted=False),
    RowConfig("ckpt_mp_feat", "fast-DiT: grad ckpt + mixed precision + pre-extracted features", _CKPT_MP),
    RowConfig("mp_feat", "mixed precision + features, no grad ckpt", _MP),
    RowConfig("selective", "selective grad ckpt (fc2 kept) + mixed precision + features", _SEL_MP),
    RowConfig("fused_adaln", "ckpt + bf16 + features + Triton fused adaLN", (*_CKPT_MP, "--fused-adaln")),
    RowConfig("triton_attn", "ckpt + bf16 + features + Triton attention", (*_CKPT_MP, "--attn-backend", "triton")),
    RowConfig("zero2", "ckpt + bf16 + features + DeepSpeed ZeRO-2 (1 process)", (*_CKPT_MP, *_ZERO2)),
    RowConfig("nockpt_compile", "no ckpt + compile (inductor adaLN)", (*_MP, "--compile")),
    RowConfig("nockpt_compile_fused", "no ckpt + compile + fused adaLN", (*_MP, "--compile", "--fused-adaln")),
    RowConfig("compile", "ckpt + compile (inductor adaLN)", (*_CKPT_MP, "--compile")),
    RowConfig("compile_fused", "ckpt + compile + fused adaLN", (*_CKPT_MP, "--compile", "--fused-adaln")),
    RowConfig("selective_compile", "selective ckpt + compile (inductor adaLN)", (*_SEL_MP, "--compile")),
    RowConfig("selective_compile_fused", "selective ckpt + compile + fused adaLN",
              (*_SEL_MP, "--compile", "--fused-adaln")),
    # SiT's objective against DiT's at the same settings (TARGETS: equal steps/s within noise)
    RowConfig("flow_nockpt", "mp_feat + --objective flow (SiT's transport)", (*_MP, "--objective", "flow")),
    RowConfig("flow", "ckpt_mp_feat + --objective flow (SiT's transport)", (*_CKPT_MP, "--objective", "flow")),
    # REPA against its own baseline (the tiny CPU model takes patch 8 there: REPA aligns token by token)
    RowConfig("repa_base", "REPA's baseline: ckpt + bf16 + features, no --repa", _CKPT_MP, tiny_patch=8),
    RowConfig("repa", "REPA: repa_base + --repa (frozen DINOv2: B/14, tiny on CPU; projector)",
              (*_CKPT_MP, "--repa", "--encoder", "<encoder>", "--encoder-depth", "<depth>", "--projector-dim",
               "<projector>"), tiny_patch=8),
)
ROW_KEYS = tuple(r.key for r in ROWS)
BASELINES = ("original_math", "original_sdpa")
TINY_FLAGS = ("--depth", "2", "--hidden-size", "64", "--num-heads", "4")  # the CPU model: DiT-S/2 shrunk
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
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--model", default=None, help="a DiT_models name or 'tiny' (default: DiT-XL/2 on CUDA, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default: 256; 32 for tiny)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 5 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2)")
    p.add_argument("--rows", default="all", help=f"comma-separated, in this order: {', '.join(ROW_KEYS)}")
    p.add_argument("--mp-dtype", choices=("bf16", "fp16"), default="bf16",
                   help="train.py --precision of the mixed-precision rows (fp16: CUDA only, dynamic loss scaling)")
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
    """Rows named in ``spec``, in the order given ("all" = every row in table order); unknown names raise."""
    if spec.strip() == "all":
        return list(ROWS)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in ROW_KEYS]
    if unknown or not wanted:
        raise SystemExit(f"--rows: unknown row(s) {unknown or spec!r}; choose from: {', '.join(ROW_KEYS)} "
                         f"(or 'all')")
    by_key = {r.key: r for r in ROWS}
    return [by_key[w] for w in dict.fromkeys(wanted)]


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults (GPU: DiT-XL/2 at batch 128; CPU: tiny model, batch 8)."""
    if args.triton_interpret and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--triton-interpret must be seen before triton is imported: pass it on the command "
                         "line of benchmarks/table.py, or set TRITON_INTERPRET=1 in the environment")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu")
    if args.device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # the engine runs where the table does
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


def vae_config(args) -> tuple[dict, str]:
    from dit_fast.models import DiT_models
    if args.model == "tiny":
        return TINY_VAE_CONFIG, "tiny"
    if args.model in DiT_models:
        return SD_VAE_CONFIG, "SD"
    raise SystemExit(f"--model {args.model!r}: choose 'tiny' or one of {', '.join(DiT_models)}")


def latent_size(args) -> int:
    from dit_fast.vae import downsample_of
    config, kind = vae_config(args)
    downsample = downsample_of(config["block_out_channels"])
    if args.image_size % downsample:
        raise SystemExit(f"--image-size {args.image_size} is not divisible by the {kind} VAE's "
                         f"downsampling factor {downsample}")
    return args.image_size // downsample


def build_vae(args):
    from diffusers import AutoencoderKL

    from dit_fast.vae import VAE
    return VAE(AutoencoderKL(**vae_config(args)[0]))


def vae_note(args) -> str:
    config, kind = vae_config(args)
    return (f"VAE on the fly: randomly initialised diffusers AutoencoderKL with the {kind} VAE config "
            f"(block_out_channels {config['block_out_channels']}; same compute as the real weights, which do "
            "not matter for timing), fp32, latents sampled")


# ------------------------------------------------------------------------------------------ rows

def row_flags(row: RowConfig, args) -> list[str]:
    """The row's train.py flags, the mixed-precision dtype of this run substituted."""
    flags = list(row.flags)
    if args.mp_dtype != "bf16":
        flags = [args.mp_dtype if f == "bf16" and flags[i - 1] == "--precision" else f
                 for i, f in enumerate(flags)]
    return flags


def train_argv(row: RowConfig, args) -> list[str]:
    """The full train.py argument list of a row (the data paths are placeholders)."""
    tiny = args.model == "tiny"
    model = ["--model", f"DiT-S/{row.tiny_patch}", *TINY_FLAGS] if tiny else ["--model", args.model]
    data = (["--features-path", "<latents>"] if row.pre_extracted else ["--data-path", "<images>", "--vae", "ema"])
    return [*model, "--image-size", str(args.image_size), "--num-classes", str(args.num_classes),
            "--global-batch-size", str(args.batch), "--global-seed", str(args.seed), *data,
            *[_TINY_REPA[f] if tiny and f in _TINY_REPA else _REPA.get(f, f) for f in row_flags(row, args)]]


# REPA's block 8 and projector width 2048 (of SiT-XL's 1152); the tiny model's: block 1, width 2 x 64.
_REPA, _TINY_REPA = {"<depth>": "8", "<projector>": "2048"}, {"<depth>": "1", "<projector>": "128"}


def train_command(row: RowConfig, args) -> str:
    """The command line a user runs for this row (one GPU)."""
    return "deepspeed --num_gpus 1 train.py " + shlex.join(train_argv(row, args))


def row_config(row: RowConfig, args):
    """train.py's parser and config builder on the row's flags: the Config train(cfg) would get."""
    from dit_fast.config import config_from_args
    from dit_fast.train import cli as train_cli
    cfg = config_from_args(train_cli.build_parser().parse_args(train_argv(row, args)))
    if cfg.train.deepspeed_config and not os.path.isabs(cfg.train.deepspeed_config):
        cfg.train.deepspeed_config = str(ROOT / cfg.train.deepspeed_config)
    cfg.model.in_channels = 4                       # latents (SD VAE or the tiny one: 4 channels)
    cfg.model.input_size = latent_size(args)
    if cfg.train.objective == "repa" and importlib.util.find_spec("transformers"):  # a random DINOv2, built once
        from repa_encoder import encoder_folder
        cfg.repa.encoder = str(encoder_folder(args.model == "tiny", Path(tempfile.gettempdir()) / "dit_fast_encoders"))
    return cfg


def switches(cfg) -> dict:
    """The row's switches as read back from its Config (the table's columns)."""
    m, t = cfg.model, cfg.train
    ckpt = m.grad_checkpointing
    ckpt_name = ckpt if isinstance(ckpt, str) else {0.0: "no", 1.0: "full"}.get(float(ckpt), f"{ckpt:g}")
    zero = Path(t.deepspeed_config).stem if t.deepspeed_config else "zero0"  # configs/deepspeed/zeroN*.json
    return {"grad_ckpt": ckpt_name, "precision": t.precision, "pre_extracted": cfg.data.features_path is not None,
            "attn_backend": m.attn_backend, "fused_adaln": m.adaln_backend == "triton", "compile": t.compile,
            "zero_stage": int(zero[4]) if zero[:4] == "zero" and zero[4:5].isdigit() else None}


def unavailable_reason(row: RowConfig, cfg, device: torch.device) -> str | None:
    """Why a row cannot run here (checked before building anything), or None."""
    from dit_fast import dispatch
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (train.py needs it: pip install deepspeed)"
    if cfg.train.objective == "repa" and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (REPA's encoder needs it: pip install 'dit-fast[repa]')"
    if not row.pre_extracted and importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed (the VAE-on-the-fly rows need it: pip install diffusers)"
    if cfg.train.precision == "fp16" and device.type != "cuda":
        return "--precision fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16)"
    ok, why = dispatch.attn_backend_status(cfg.model.attn_backend, device)
    if not ok:
        return f"attention backend {cfg.model.attn_backend!r} unavailable: {why}"
    if cfg.model.adaln_backend != "torch":
        from dit_fast_kernels import triton_status
        ok, why = triton_status(device)
        if not ok:
            return f"fused adaLN unavailable: {why}"
    return None


def run_row(row: RowConfig, args) -> dict:
    """Measure one row in a fresh state; failures become a status, never an exception."""
    cfg = row_config(row, args)
    result = {"key": row.key, "label": row.label, **switches(cfg), "command": train_command(row, args),
              "status": "ok"}
    reason = unavailable_reason(row, cfg, args.device)
    if reason:
        result["status"] = f"skipped: {reason}"
        return result
    state = None
    free_state(None)
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    shape = (4, cfg.model.input_size, cfg.model.input_size) if row.pre_extracted else \
        (3, args.image_size, args.image_size)
    try:
        state = build_state(cfg, lambda: build_vae(args), shape, args.num_classes, args.seed)
        result.update(measure(state, args.device, args.steps, args.warmup))
        if state.encoder_call is not None:
            from repa_encoder import measure_encoder
            result.update(measure_encoder(state.encoder_call, state.encoder, args.device, args.steps,
                                          result["mean_step_s"]))
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


def add_rates(result: dict, batch: int, flops_per_image: int, peaks) -> None:
    """steps/s, images/s, MB and MFU (against the row's precision peak) for a measured row."""
    if result["status"] != "ok":
        return
    result["steps_per_s"] = 1.0 / result["mean_step_s"]
    result["images_per_s"] = batch * result["steps_per_s"]
    result["peak_mb"] = result["peak_bytes"] / 2 ** 20
    if "peak_reserved_bytes" in result:
        result["peak_reserved_mb"] = result["peak_reserved_bytes"] / 2 ** 20
    peak = peaks.peak(result["precision"] != "fp32")
    result["mfu"] = mfu(result["images_per_s"], flops_per_image, peak)
    result["mfu_peak"] = peak.source


def add_ratios(results: list[dict]) -> dict:
    """steps/s ratios against each baseline that ran: {"ratio": vs math (or fast-DiT's ckpt row if the
    math baseline did not run), "ratio_sdpa": vs original + SDPA}; returns which rows were used."""
    ok = {r["key"]: r for r in results if r["status"] == "ok"}
    refs = {"ratio": next((k for k in ("original_math", "ckpt") if k in ok), None),
            "ratio_sdpa": "original_sdpa" if "original_sdpa" in ok else None}
    for r in results:
        for field, ref in refs.items():
            r[field] = r["steps_per_s"] / ok[ref]["steps_per_s"] if ref and r["status"] == "ok" else None
    return refs


def run_table(args: argparse.Namespace, progress: bool = True) -> tuple[list[dict], dict]:
    """Measure the selected rows; returns (rows, metadata). Results are written after every row."""
    rows = select_rows(args.rows)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_rows(args, rows, progress)
    finally:
        torch.set_num_threads(threads)


def _run_rows(args, rows: list[RowConfig], progress: bool) -> tuple[list[dict], dict]:
    from dit_fast.models import build_model
    math_cfg = row_config(ROWS[0], args)
    flops_fwd = forward_flops_per_image(lambda: build_model(math_cfg.model), math_cfg.model.input_size)
    peaks = PeakTable(args.device)
    meta = report.metadata(args, math_cfg.model.input_size, flops_fwd, train_flops_per_image(flops_fwd),
                           peaks.info(), vae_note(args))
    results: list[dict] = []
    start = time.perf_counter()
    bar = _progress(rows, progress)
    for row in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(row.key)
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            cfg = row_config(row, args)
            result = {"key": row.key, "label": row.label, **switches(cfg), "command": train_command(row, args),
                      "status": f"skipped: time budget (--max-seconds {args.max_seconds:g}) used up"}
        else:
            result = run_row(row, args)
        add_rates(result, args.batch, meta["train_flops_per_image"], peaks)
        results.append(result)
        meta["reference_rows"] = add_ratios(results)
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
