"""sample.py: one seeded grid of class-conditional samples (the original sample.py's flags and images).

With the same seed and weights, fp32 eager DDPM gives the same grid as the original sample.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dit_fast.checkpoint import official_checkpoint_name
from dit_fast.cli import OneLineParser
from dit_fast.config import DEFAULT_CLASS_LABELS

from .build import decode
from .compiled import timed
from .flags import (add_common_flags, build_sampling_model, check_class_labels, format_sample_config,
                    load_sampling_vae, resolve_device, resolve_sample_config, run_cli, sampler_of)
from .images import save_image


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sample.py", description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, cfg_default=4.0, vae_default="mse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-labels", type=int, nargs="+", default=list(DEFAULT_CLASS_LABELS),
                        help="one image per label (default: the original's 8 labels)")
    parser.add_argument("--out", type=str, default="sample.png", help="where the PNG grid is written")
    return parser


def main(argv=None) -> dict:
    """Run sample.py with ``argv``; returns {"path", "images", "compile_seconds", "sample_seconds"}."""
    cfg, source = resolve_sample_config(build_parser().parse_args(argv))
    if Path(cfg.out).is_dir():
        raise IsADirectoryError(f"--out {cfg.out!r} is a directory; give the path of the PNG to write")
    check_class_labels(cfg.class_labels, cfg.model.num_classes)
    print(format_sample_config(cfg))
    device = resolve_device(cfg.device, cfg.tf32, cfg.model)
    m = cfg.model

    # The original's order of RNG use: seed, model init, (weights), VAE load, x_T, per-step noise.
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        weights = source.weights if source else official_checkpoint_name(m.image_size)
        model = build_sampling_model(m, weights, device, saved=bool(source and source.config))
        vae = load_sampling_vae(cfg, device)

        n = len(cfg.class_labels)
        z = torch.randn(n, model.in_channels, m.input_size, m.input_size, device=device)
        y = torch.tensor(cfg.class_labels, device=device)
        # sample.py always runs the CFG forward, even at cfg_scale 1 (unlike sample_ddp.py).
        sampler = sampler_of(cfg, model, use_cfg=True)
        if cfg.compile:
            seconds = sampler.compile(z.shape, mode=cfg.compile_mode)
            print(f"Compiled the sampling step in {seconds:.1f} s (excluded from sampling time).")
        samples, sample_seconds = timed(lambda: sampler.sample(z, y, progress=True), device)
        images = decode(samples, vae)
        path = save_image(images, cfg.out, nrow=4, normalize=True, value_range=(-1, 1))

    print(f"Sampled {n} images in {sample_seconds:.2f} s ({n / sample_seconds:.2f} images/s, "
          f"{cfg.num_sampling_steps} {cfg.sampler.upper()} steps, {cfg.precision}"
          f"{', compiled' if cfg.compile else ''}, {device}).")
    print(f"Saved the grid to {Path(path).resolve()}")
    return {"path": Path(path), "images": images, "compile_seconds": sampler.compile_seconds,
            "sample_seconds": sample_seconds}


def cli(argv=None) -> None:
    """Entry point: library errors (bad flags, missing checkpoint or VAE) become one clear line."""
    run_cli(main, "sample.py", argv)
