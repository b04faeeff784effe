"""Sample new images from a pre-trained DiT: the original sample.py's flags and images, faster.

    python sample.py --image-size 256 --seed 0                       # official DiT-XL/2, 250 DDPM steps
    python sample.py --compile --precision bf16 --class-labels 207 360 387 --out grid.png
    python sample.py --model DiT-S/2 --vae none --image-size 32 \\
        --ckpt results/000-DiT-S-2/checkpoints/step-0100000/ema-0100000.pt   # train.py's EMA export

With the same seed and weights, fp32 eager DDPM gives the same grid as the original sample.py.
"""
import argparse
from pathlib import Path

import torch

from dit_fast.config import DEFAULT_CLASS_LABELS, SampleConfig
from dit_fast.diffusion import create_diffusion
from dit_fast.sample_cli import (add_common_flags, build_sampling_model, check_class_labels,
                                 check_official_defaults, format_sample_config, model_input_size,
                                 resolve_device, run_cli)
from dit_fast.sample_files import save_image
from dit_fast.sampling import Sampler, decode, timed
from dit_fast.vae import is_pixel_space, load_vae


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, cfg_default=4.0)
    parser.add_argument("--vae", type=str, default="mse", help="ema | mse | a local diffusers dir | none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-labels", type=int, nargs="+", default=list(DEFAULT_CLASS_LABELS),
                        help="one image per label (default: the original's 8 labels)")
    parser.add_argument("--out", type=str, default="sample.png", help="where the PNG grid is written")
    return parser


def main(argv=None) -> dict:
    """Run sample.py with `argv`; returns {"path", "images", "compile_seconds", "sample_seconds"}."""
    cfg = SampleConfig.from_args(build_parser().parse_args(argv))
    print(format_sample_config(cfg))
    device = resolve_device(cfg.device, cfg.tf32)
    input_size = model_input_size(cfg.model, cfg.image_size, cfg.vae)
    check_class_labels(cfg.class_labels, cfg.num_classes)
    if cfg.ckpt is None:
        check_official_defaults(cfg.model, cfg.image_size, cfg.num_classes, cfg.vae)
    in_channels = cfg.in_channels if is_pixel_space(cfg.vae) else 4

    # The original's order of RNG use: seed, model init, (weights), VAE load, x_T, per-step noise.
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        model = build_sampling_model(cfg.model, input_size, cfg.num_classes, in_channels,
                                     cfg.ckpt or f"DiT-XL-2-{cfg.image_size}x{cfg.image_size}.pt",
                                     device, cfg.attn_backend, cfg.fused_adaln, depth=cfg.depth,
                                     hidden_size=cfg.hidden_size, num_heads=cfg.num_heads)
        diffusion = create_diffusion(str(cfg.num_sampling_steps))
        vae = load_vae(cfg.vae, device=device)

        n = len(cfg.class_labels)
        z = torch.randn(n, model.in_channels, input_size, input_size, device=device)
        y = torch.tensor(cfg.class_labels, device=device)
        # sample.py always runs the CFG forward, even at cfg_scale 1 (unlike sample_ddp.py).
        sampler = Sampler(model, diffusion, cfg_scale=cfg.cfg_scale, num_classes=cfg.num_classes,
                          use_cfg=True, sampler=cfg.sampler, precision=cfg.precision,
                          guide_all_channels=cfg.guide_all_channels)
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


if __name__ == "__main__":
    cli()
