"""The bundled demo data set: scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes).

It ships inside scikit-learn, so the demo needs no download.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .latents import write_latent_dataset


def digits_dataset(image_size: int = 16, mode: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as pixel-space training data.

    Args:
        image_size: output side; the 8x8 originals are upsampled (or kept at 8).
        mode: "bilinear" (smooth strokes, align_corners=False) or "nearest".

    Returns:
        (images float32 (N, 1, S, S) in [-1, 1], labels int64 (N,)) with N = 1797.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits demo needs scikit-learn: pip install scikit-learn "
                          "(or pip install -e '.[demo]')") from err
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 for the 8x8 digits, got {image_size}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    digits = load_digits()
    # Pixel values are ink counts 0..16; map them linearly onto the model's [-1, 1] range.
    x = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # (N, 1, 8, 8)
    if image_size != 8:
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        x = F.interpolate(x, size=(image_size, image_size), mode=mode, **kwargs)
    x = x.clamp_(-1.0, 1.0)  # bilinear is convex, this only guards float round-off
    return x.numpy(), digits.target.astype(np.int64)


def write_digits_features(out_dir: str | os.PathLike, image_size: int = 16,
                          mode: str = "bilinear") -> Path:
    """Write the digits in the packed latent format, ready for ``train.py --features-path``.

    Pixel space (vae "none", C = 1). Slot 1 of each item is NOT a horizontal flip: a mirrored
    digit is a different (or no) digit, so the same image is stored twice and the index says
    ``flips: "duplicate"``; the trainer's random pick between the slots is then a no-op.
    """
    images, labels = digits_dataset(image_size, mode)
    both = np.stack([images, images], axis=1)  # (N, 2, 1, S, S)
    return write_latent_dataset(out_dir, both, labels, class_names=[str(d) for d in range(10)],
                                image_size=image_size, vae="none", flips="duplicate",
                                shard_size=len(labels))


def main(argv=None) -> None:
    """``python -m dit_fast.data.digits --features-path DIR [--image-size 16]``."""
    import argparse

    p = argparse.ArgumentParser(description="Write scikit-learn's digits as packed features "
                                "(pixel space) for train.py --features-path DIR --vae none.")
    p.add_argument("--features-path", required=True)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--mode", choices=["bilinear", "nearest"], default="bilinear")
    args = p.parse_args(argv)
    out = write_digits_features(args.features_path, args.image_size, args.mode)
    print(f"wrote 1797 digits ({args.image_size}x{args.image_size}, 10 classes) to {out}")


if __name__ == "__main__":
    main()
