"""`make demo`: a real DiT run on a CPU in minutes, with a quality number at the end.

    python -m dit_fast.demo                 # results/demo/{digits_grid.png, samples.npz, metrics.json, train_log.txt}
    python -m dit_fast.demo --objective flow --out results/demo-flow    # SiT's flow matching, ODE samples

1. writes scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes; no download) in the
   packed pixel-space format of ``train.py --features-path ... --vae none``;
2. trains a small class-conditional DiT through ``train.py`` and its DeepSpeed engine (the command
   users run on GPUs; on a GPU machine the same command trains on the GPU), with DiT's diffusion
   objective or (``--objective flow``) SiT's flow matching;
3. loads the exported EMA weights and samples every class with classifier-free guidance through
   dit_fast.sampling.build_sampler (the sampler behind sample.py): DDPM, or SiT's ODE / SDE;
4. scores the samples with a classifier trained on the real digits (dit_fast.scoring): the share
   recognised as their class, and a Fréchet distance in that classifier's feature space.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"\(step=(\d+)\)")


DIGIT_CLASSES = 10
DEMO_MODEL = dict(model="DiT-S/2", image_size=8, num_classes=DIGIT_CLASSES, depth=4, hidden_size=128, num_heads=4)


def build_parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser
    from .config import add_model_flags
    from .sampling import SAMPLERS

    p = OneLineParser(prog="dit_fast.demo", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--out", default="results/demo", help="output directory (its train/ subfolder is replaced)")
    # train.py's model flags (one ModelConfig); the small DiT that learns the digits on a CPU in minutes.
    # --image-size: 8 (the originals) or upsampled, e.g. 16.
    add_model_flags(p, defaults=DEMO_MODEL)
    a("--max-steps", type=int, default=800, help="optimizer steps (800: 100%% class accuracy in a 2-core run, 2026-11-26)")
    a("--global-batch-size", type=int, default=128)
    a("--lr", type=float, default=2e-3)
    a("--ema-decay", type=float, default=0.99,
      help="per step; DiT's 0.9999 averages over ~10K steps, far longer than this run")
    a("--log-every", type=int, default=50)
    a("--objective", default="diffusion", choices=("diffusion", "flow"),
      help="DiT's diffusion or SiT's flow matching (Linear path, velocity)")
    a("--num-sampling-steps", type=int, default=50,
      help="respaced DDPM/DDIM steps, solver steps, or the flow sampler's grid points")
    a("--sampler", default="ddpm", choices=SAMPLERS,
      help="diffusion only; benchmarks/sampler_table.py compares them")
    a("--mode", default="ODE", choices=("ODE", "SDE"), help="flow only: SiT's sampler")
    a("--sampling-method", default="heun",
      help="flow only: ODE euler | heun | midpoint | dopri5 (torchdiffeq), SDE Euler | Heun")
    a("--cfg-scale", type=float, default=3.0)
    a("--samples-per-class", type=int, default=20)
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0,
      help="CPU threads for training and sampling; 0 = all cores, or 1 when other work loads the machine")
    return p


def check_args(args) -> None:
    """Fail before any work (before the output folder is touched), naming the flag to change: the
    training run is validated by train.py's own parser and config (the same messages)."""
    from .config import config_from_args
    from .train.cli import build_parser as train_parser
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out!r} is a file; give a directory")
    if args.threads < 0 or args.cfg_scale < 1.0:
        raise ValueError(f"need --threads >= 0 and --cfg-scale >= 1 (got {args.threads}, {args.cfg_scale})")
    for flag in ("max_steps", "num_sampling_steps", "samples_per_class"):  # max_steps: also --ckpt-every
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    m = config_from_args(train_parser().parse_args(train_argv(args, Path("features"), Path("runs")))).model
    if m.num_classes != DIGIT_CLASSES:
        raise ValueError(f"--num-classes {m.num_classes}: the digits have {DIGIT_CLASSES} classes")
    if m.image_size < 8 or m.image_size % m.patch_size:
        raise ValueError(f"--image-size {m.image_size} must be >= 8 and divisible by the patch size "
                         f"{m.patch_size} of --model {m.model}")


def busy_cores(seconds: float = 0.5) -> float:
    """Cores other processes keep busy right now, from two reads of /proc/stat (the load average
    lags by minutes: right after `make test` it still reports a load that is gone)."""
    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)          # idle + iowait, total
    try:
        idle0, total0 = read()
        time.sleep(seconds)
        idle1, total1 = read()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
    return busy * (os.cpu_count() or 1)


def pick_threads(requested: int) -> int:
    """All cores on an idle machine; fewer on a busy one (OpenMP threads that wait for a core to
    come free spin, and a contended 2-thread step was measured 6x slower than 1 thread)."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    busy = busy_cores()
    return cores if busy < 0.5 else max(1, cores - int(round(busy)))


# ------------------------------------------------------------------------------------ training
def train_argv(args, features: Path, results_dir: Path) -> list[str]:
    """train.py's flags for the demo run: the model flags of the demo's ModelConfig, then the recipe."""
    from .config import model_config_from_args, model_flags
    return [*model_flags(model_config_from_args(args)),
            "--features-path", str(features), "--vae", "none", "--global-batch-size", str(args.global_batch_size),
            "--max-steps", str(args.max_steps), "--log-every", str(args.log_every),
            "--ckpt-every", str(args.max_steps), "--keep-last", "1", "--results-dir", str(results_dir),
            "--lr", str(args.lr), "--ema-decay", str(args.ema_decay), "--precision", "fp32",
            "--global-seed", str(args.seed), "--num-workers", "0", "--objective", args.objective]


def train_command(args, features: Path, results_dir: Path) -> list[str]:
    """The plain-python train.py command (a world of one; DeepSpeed ZeRO stage 0)."""
    train_py = REPO_ROOT / "train.py"
    if not train_py.is_file():
        raise FileNotFoundError(f"{train_py} not found: run the demo from a dit_fast source checkout")
    return [sys.executable, str(train_py), *train_argv(args, features, results_dir)]


def run_training(cmd: list[str], max_steps: int, threads: int) -> list[str]:
    """Run train.py, echoing its log above a progress bar driven by its step lines.

    Returns the output lines; raises RuntimeError with the tail of the output if it fails.
    """
    from tqdm.auto import tqdm

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    lines: list[str] = []
    bar = tqdm(total=max_steps, desc="training", unit="step")
    with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                step = STEP_LINE.search(line)
                if step:
                    bar.update(int(step.group(1)) - bar.n)
                if step or "Experiment directory" in line or "Parameters" in line or "error" in line.lower():
                    bar.write(line)
        except BaseException:  # Ctrl-C or a crash here: do not leave the trainer running
            proc.kill()
            raise
        proc.wait()
    bar.close()
    if proc.returncode != 0:
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"train.py failed (exit {proc.returncode}):\n{tail}\ncommand: {' '.join(cmd)}")
    return lines


def find_run(results_dir: Path) -> tuple[Path, Path]:
    """(run dir, EMA weights of its last checkpoint) of the single run under results_dir."""
    from .sampling.run_source import resolve_ckpt

    runs = sorted(p for p in results_dir.iterdir() if (p / "checkpoints").is_dir())
    if not runs:
        raise FileNotFoundError(f"train.py left no run with checkpoints under {results_dir}")
    return runs[-1], resolve_ckpt(str(runs[-1])).weights  # its newest complete checkpoint's EMA file


# ------------------------------------------------------------------------------------ sampling
def load_ema_model(run_dir: Path, ema_path: Path, device: torch.device) -> torch.nn.Module:
    """The DiT described by the run's config.json, holding the EMA weights, in eval mode."""
    from .checkpoint import load_into_model, load_state_dict
    from .config import load_config
    from .models import build_model

    m = load_config(run_dir / "config.json").model
    # Speed switches of the run (e.g. Triton kernels) are not needed to sample its digits.
    model = build_model(m, attn_backend="sdpa", adaln_backend="torch", grad_checkpointing=0.0)
    load_into_model(model, load_state_dict(ema_path, prefer_ema=True))
    return model.to(device).eval()


def sample_digits(model, args, device: torch.device, run_dir: Path | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """samples_per_class images of each class (class-major order) in [-1, 1]: (N, 1, S, S), labels."""
    from .sampling import build_sampler

    torch.manual_seed(args.seed)
    labels = torch.arange(DIGIT_CLASSES).repeat_interleave(args.samples_per_class)  # (N,)
    z = torch.randn(len(labels), model.in_channels, args.image_size, args.image_size)
    # One grey channel with a learned variance: the output is [eps, variance], so the original's
    # "first three channels" would also extrapolate the variance weight; guide the noise channel only.
    process, method, options = _process(args, run_dir)
    sampler = build_sampler(model, process, method=method, cfg_scale=args.cfg_scale, num_classes=DIGIT_CLASSES,
                            use_cfg=True, guide_all_channels=True, **options)
    samples = sampler.sample(z.to(device), labels.to(device), progress=True)
    return samples.clamp(-1, 1).cpu(), labels.numpy()


def _process(args, run_dir: Path | None) -> tuple:
    """(diffusion or transport, sampler method, flow options) the demo samples with."""
    if getattr(args, "objective", "diffusion") != "flow":  # callers' Namespaces may predate the flag
        from .diffusion import create_diffusion
        return create_diffusion(str(args.num_sampling_steps)), args.sampler, {}
    import dataclasses

    from .config import TransportConfig, load_config
    from .transport import create_transport
    tc = load_config(run_dir / "config.json").transport if run_dir else TransportConfig()
    options = dict(sampling_method=args.sampling_method, num_steps=args.num_sampling_steps)
    if args.mode == "SDE":
        options["diffusion_form"] = "sigma"  # SiT's sample.py default (SBDM is singular at t = 0 here)
    return create_transport(**dataclasses.asdict(tc)), args.mode.lower(), options


def save_grid(samples: torch.Tensor, per_class: int, path: Path, scale: int) -> Path:
    """One row per class, upscaled (nearest) so a person can see the digits."""
    from PIL import Image

    from .sampling.images import grid_to_uint8, make_grid, save_png

    grid = grid_to_uint8(make_grid(samples, nrow=per_class, padding=1, normalize=True,
                                   value_range=(-1, 1), pad_value=0.5))
    image = Image.fromarray(grid)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    save_png(np.asarray(image), path)
    return path


# ------------------------------------------------------------------------------------ main
def environment(device: torch.device, threads: int, load_at_start: float) -> dict:
    """Where and with what the demo ran (the load average says whether the machine was shared)."""
    import deepspeed
    import sklearn

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": f"{device.type}: {name}", "cpu_count": os.cpu_count(), "threads": threads,
            "load_average_at_start": round(load_at_start, 2),
            "load_average_at_end": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "sklearn": sklearn.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv=None) -> dict:
    """Run the demo; returns the metrics written to metrics.json."""
    from .data.digits import write_digits_features
    from .atomic import atomic_write, atomic_write_text
    from .sampling.images import to_uint8_hwc
    from .scoring import DigitScorer

    args = build_parser().parse_args(argv)
    check_args(args)
    start = time.perf_counter()
    out = Path(args.out).resolve()  # train.py runs from the repository root
    train_dir = out / "train"
    shutil.rmtree(train_dir, ignore_errors=True)  # one run per demo: the newest is the one scored
    train_dir.mkdir(parents=True)
    load = os.getloadavg()[0]
    threads = pick_threads(args.threads)
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"[demo] {device.type}, {threads} thread(s); writing the digits to {train_dir / 'features'}")
    features = write_digits_features(train_dir / "features", args.image_size)

    t0 = time.perf_counter()
    lines = run_training(train_command(args, features, train_dir / "runs"), args.max_steps, threads)
    train_seconds = time.perf_counter() - t0
    run_dir, ema_path = find_run(train_dir / "runs")
    log = (run_dir / "log.txt").read_bytes()
    atomic_write(out / "train_log.txt", lambda f: f.write(log))

    t0 = time.perf_counter()
    with torch.no_grad():
        samples, labels = sample_digits(load_ema_model(run_dir, ema_path, device), args, device, run_dir)
    sample_seconds = time.perf_counter() - t0
    images = to_uint8_hwc(samples)  # (N, S, S, 1)
    atomic_write(out / "samples.npz", lambda f: np.savez(f, arr_0=images, labels=labels))
    grid = save_grid(samples, args.samples_per_class, out / "digits_grid.png",
                     scale=max(1, 64 // args.image_size))

    metrics = DigitScorer(args.image_size, seed=0).score(images, labels)
    metrics.update(recipe={k: v for k, v in vars(args).items() if k not in ("out",)},
                   final_train_loss=_last_loss(lines), train_seconds=round(train_seconds, 1),
                   sample_seconds=round(sample_seconds, 1),
                   wall_seconds=round(time.perf_counter() - start, 1),
                   ema_weights=str(ema_path), grid=str(grid), **environment(device, threads, load))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    print(f"\n[demo] grid of generated digits (one row per class 0-9): {grid.resolve()}")
    print(f"[demo] class accuracy {metrics['accuracy']:.1%} under an independent MLP classifier "
          f"(its own held-out accuracy {metrics['classifier_heldout_accuracy']:.1%}); "
          f"Fréchet distance {metrics['frechet_distance']:.2f} "
          f"(real digits vs real: {metrics['frechet_distance_real_subset']:.2f})")
    print(f"[demo] {metrics['num_samples']} samples in {out / 'samples.npz'}, metrics in "
          f"{out / 'metrics.json'}, training log in {out / 'train_log.txt'}; "
          f"{metrics['wall_seconds']:.0f} s in all ({train_seconds:.0f} s training)")
    return metrics


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _last_loss(lines: list[str]) -> float | None:
    losses = [float(m.group(1)) for m in (re.search(r"Train Loss: ([0-9.eE+-]+)", ln) for ln in lines) if m]
    return losses[-1] if losses else None


def cli(argv=None) -> None:
    """Entry point: bad input ends with one clear line and exit code 2 (dit_fast.cli); a failed
    training run (train.py's own error) with one line and exit code 1."""
    from .cli import one_line, run_entry
    try:
        code = run_entry(main, "dit_fast.demo", argv)
    except RuntimeError as err:
        sys.exit(f"dit_fast.demo: error: {one_line(err)}")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    cli()
