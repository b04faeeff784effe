"""Sample new images from a pre-trained DiT: the original sample.py's flags and images, faster.

    python sample.py --image-size 256 --seed 0                       # official DiT-XL/2, 250 DDPM steps
    python sample.py --compile --precision bf16 --class-labels 207 360 387 --out grid.png
    python sample.py --model DiT-S/2 --ckpt results/000/checkpoints/0100000.pt --vae none --image-size 32

With the same seed and weights, fp32 eager DDPM gives the same grid as the original sample.py.
"""
import argparse
import sys
from pathlib import Path

import torch

from dit_fast.diffusion import create_diffusion
from dit_fast.images import save_image
from dit_fast.sampling import (DEFAULT_CLASS_LABELS, SampleConfig, Sampler, add_common_flags,
                               build_sampling_model, check_class_labels, check_official_defaults, decode,
                               format_sample_config, patch_size_of, resolve_device, sample_size, timed,
                               vae_downsample)
from dit_fast.vae import load_vae


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
    args = SampleConfig.from_args(build_parser().parse_args(argv))
    print(format_sample_config(args))
    device = resolve_device(args.device, args.tf32)
    input_size = sample_size(args.image_size, vae_downsample(args.vae), patch_size_of(args.model))
    check_class_labels(args.class_labels, args.num_classes)
    if args.ckpt is None:
        check_official_defaults(args.model, args.image_size, args.num_classes, args.vae)
    pixel_space = args.vae.lower() == "none"
    in_channels = args.in_channels if pixel_space else 4

    # The original's order of RNG use: seed, model init, (weights), VAE load, x_T, per-step noise.
    torch.manual_seed(args.seed)
    with torch.no_grad():
        model = build_sampling_model(args.model, input_size, args.num_classes, in_channels,
                                     args.ckpt or f"DiT-XL-2-{args.image_size}x{args.image_size}.pt",
                                     device, args.attn_backend, args.fused_adaln)
        diffusion = create_diffusion(str(args.num_sampling_steps))
        vae = load_vae(args.vae, device=device)

        n = len(args.class_labels)
        z = torch.randn(n, model.in_channels, input_size, input_size, device=device)
        y = torch.tensor(args.class_labels, device=device)
        # sample.py always runs the CFG forward, even at cfg_scale 1 (unlike sample_ddp.py).
        sampler = Sampler(model, diffusion, cfg_scale=args.cfg_scale, num_classes=args.num_classes,
                          use_cfg=True, sampler=args.sampler, precision=args.precision)
        if args.compile:
            seconds = sampler.compile(z.shape, mode=args.compile_mode)
            print(f"Compiled the sampling step in {seconds:.1f} s (excluded from sampling time).")
        samples, sample_seconds = timed(lambda: sampler.sample(z, y, progress=True), device)
        images = decode(samples, vae)
        path = save_image(images, args.out, nrow=4, normalize=True, value_range=(-1, 1))

    print(f"Sampled {n} images in {sample_seconds:.2f} s ({n / sample_seconds:.2f} images/s, "
          f"{args.num_sampling_steps} {args.sampler.upper()} steps, {args.precision}"
          f"{', compiled' if args.compile else ''}, {device}).")
    print(f"Saved the grid to {Path(path).resolve()}")
    return {"path": Path(path), "images": images, "compile_seconds": sampler.compile_seconds,
            "sample_seconds": sample_seconds}


def cli(argv=None) -> None:
    """Entry point: library errors (bad flags, missing checkpoint or VAE) become one clear line."""
    from dit_fast.checkpoint import CheckpointError
    from dit_fast.vae import VAEError
    try:
        main(argv)
    except (ValueError, FileNotFoundError, CheckpointError, VAEError) as e:
        sys.exit(f"sample.py: error: {e}")


if __name__ == "__main__":
    cli()
