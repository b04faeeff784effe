"""What sample.py and sample_ddp.py share around the sampler: their common flags, the checks of
those flags (official-checkpoint defaults, class labels, sizes), the model build, the device and TF32
choice, and the error handling of the entry point. The sampler itself is dit_fast.sampling.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from dit_fast.config import PRECISIONS
from dit_fast.sampling import SAMPLERS
from dit_fast.vae import is_pixel_space, vae_downsample


def model_input_size(model: str, image_size: int, vae_spec: str) -> int:
    """Side of the model's input for --model / --image-size / --vae (ValueError when it does not divide)."""
    from dit_fast.models import patch_size_of
    return sample_size(image_size, vae_downsample(vae_spec), patch_size_of(model))


def sample_size(image_size: int, downsample: int, patch_size: int) -> int:
    """Side of the model's input: image_size // downsample (image_size // 8 with the SD VAEs, as the
    original; image_size itself in pixel space). ValueError when the size does not divide."""
    if image_size < 1:
        raise ValueError(f"--image-size must be positive, got {image_size}")
    factor = downsample * patch_size
    if image_size % factor:
        where = (f"the patch size {patch_size} (pixel space, --vae none)" if downsample == 1
                 else f"the VAE's downsampling {downsample} x the patch size {patch_size}")
        raise ValueError(f"--image-size {image_size} must be divisible by {factor}: {where}; e.g. 256 or 512")
    return image_size // downsample


def check_official_defaults(model: str, image_size: int, num_classes: int, vae_spec: str) -> None:
    """Without --ckpt the official DiT-XL/2 checkpoint is used: the other flags must fit it."""
    problems = []
    if model != "DiT-XL/2":
        problems.append(f"--model {model} (official checkpoints are DiT-XL/2)")
    if image_size not in (256, 512):
        problems.append(f"--image-size {image_size} (official sizes are 256 and 512)")
    if num_classes != 1000:
        problems.append(f"--num-classes {num_classes} (official models have 1000)")
    if is_pixel_space(vae_spec):
        problems.append("--vae none (official models are latent-space models)")
    if problems:
        raise ValueError("without --ckpt the official DiT-XL/2 checkpoint is loaded, which does not fit "
                         + "; ".join(problems) + ". Pass --ckpt PATH to your own checkpoint.")


def check_class_labels(labels, num_classes: int) -> None:
    """Labels must be real classes: num_classes itself is the null (CFG) label."""
    bad = [c for c in labels if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"class labels {bad} are outside [0, {num_classes - 1}] (--num-classes "
                         f"{num_classes}; label {num_classes} is reserved for guidance)")
    if not labels:
        raise ValueError("give at least one class label")


def build_sampling_model(model_name: str, input_size: int, num_classes: int, in_channels: int,
                         ckpt: str, device, attn_backend: str = "sdpa", fused_adaln: bool = False,
                         **size_overrides):
    """DiT_models[model_name] built as the original sample.py does (random init, then .to(device),
    then the checkpoint, then eval()), so the global RNG is left in the original's state.
    ``size_overrides`` (depth, hidden_size, num_heads; None = the named size) build a custom-size model."""
    from dit_fast.checkpoint import load_into_model, load_state_dict
    from dit_fast.models import build_model

    state = load_state_dict(ckpt)  # reading it first draws no random numbers
    # A model trained with class_dropout_prob=0 has no null-label row: build it so (it loads, and
    # sampling without guidance works; the Sampler refuses guidance with a clear message).
    labels = state.get("y_embedder.embedding_table.weight")
    no_null = {"class_dropout_prob": 0.0} if labels is not None and labels.shape[0] == num_classes else {}
    model = build_model(model_name, input_size=input_size, num_classes=num_classes, in_channels=in_channels,
                        attn_backend=attn_backend, fused_adaln=fused_adaln, **no_null, **size_overrides)
    model = model.to(device)
    hint = (f"the checkpoint does not fit --model {model_name} --image-size/--num-classes/--in-channels "
            f"(input_size={input_size}, num_classes={num_classes}, in_channels={in_channels})")
    load_into_model(model, state, hint=hint)
    return model.eval()  # important: class dropout is a training-only behaviour


def add_common_flags(parser, *, cfg_default: float) -> None:
    """Flags sample.py and sample_ddp.py share (original names and defaults first)."""
    from dit_fast.models import DiT_models

    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256,
                        help="pixels; divisible by 8 x patch (VAE) or by the patch size (--vae none)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--cfg-scale", type=float, default=cfg_default)
    parser.add_argument("--num-sampling-steps", type=int, default=250,
                        help="respaced steps (ddpm/ddim) or solver steps (the diffusers solvers)")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="DiT checkpoint or diffusers DiT transformer folder (default: the official "
                             "DiT-XL/2 one for --image-size, downloaded once into the cache)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                        help="ddpm (the original's), ddim, or diffusers' solvers: dpm-solver++ (2M), "
                             "unipc, euler, heun (2 model calls per step but the last)")
    parser.add_argument("--in-channels", type=int, default=3, help="image channels with --vae none")
    parser.add_argument("--depth", type=int, default=None, help="custom-size model: override the depth")
    parser.add_argument("--hidden-size", type=int, default=None, help="custom-size model: override the width")
    parser.add_argument("--num-heads", type=int, default=None, help="custom-size model: override the heads")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="guide every channel (default: the first three, as the original)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the per-step function")
    parser.add_argument("--compile-mode", type=str, default=None,
                        help='torch.compile mode (default: "reduce-overhead" on CUDA, "default" on CPU)')
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="autocast dtype of the model call; the diffusion math stays fp32")
    parser.add_argument("--attn-backend", type=str, default="sdpa")
    parser.add_argument("--fused-adaln", action="store_true")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on CUDA (on by default, as the original)")
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")


def format_sample_config(cfg) -> str:
    """The resolved SampleConfig, one ``sample.key = value`` per line (printed at start)."""
    return "\n".join(f"sample.{k} = {v!r}" for k, v in asdict(cfg).items())


def resolve_device(name: Optional[str], tf32: bool = True) -> torch.device:
    """The sampling device; on CUDA also applies the TF32 choice (the original turns TF32 on)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if tf32:  # cuDNN's TF32 is on by default anyway; sample_ddp.py's --no-tf32 leaves it, as the original
            torch.backends.cudnn.allow_tf32 = True
    return device


def run_cli(main: Callable, prog: str, argv=None) -> None:
    """Run a sampling CLI's ``main``; library errors (bad flags, missing checkpoint or VAE, diffusers
    missing for a solver) exit with one clear line and exit code 2 instead of a traceback (dit_fast.cli)."""
    from dit_fast.cli import run_entry
    from dit_fast.solvers import MissingDiffusersError
    code = run_entry(main, prog, argv, extra=(MissingDiffusersError,))
    if code:
        sys.exit(code)


def check_sampling_inputs(cfg) -> None:
    """What sample.py and sample_ddp.py can check before loading anything (or joining a group)."""
    from dit_fast.vae import check_vae_spec
    for name in ("num_classes", "num_sampling_steps", "in_channels"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("depth", "hidden_size", "num_heads"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.ckpt is not None:
        from dit_fast.checkpoint import OFFICIAL_CHECKPOINTS, is_official_name
        if not is_official_name(cfg.ckpt) and not Path(cfg.ckpt).expanduser().exists():
            raise FileNotFoundError(f"No checkpoint at {cfg.ckpt} (--ckpt); pass a checkpoint file "
                                    f"or one of {', '.join(OFFICIAL_CHECKPOINTS)}")
    check_vae_spec(cfg.vae)
