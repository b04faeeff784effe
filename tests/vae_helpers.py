"""Tiny diffusers AutoencoderKL for tests (other test files may use it too; no network)."""
from pathlib import Path

import torch

# Two resolution levels: downsample 2, 4 latent channels; a few thousand parameters.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=16,
)


def tiny_autoencoder(seed: int = 0, **overrides):
    """A randomly initialised tiny AutoencoderKL (deterministic for a given seed); ``overrides``
    change its config (latent_channels=16, scaling_factor=..., shift_factor=...)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY_VAE_CONFIG, **overrides}).eval()


def save_tiny_vae(directory, seed: int = 0, **overrides) -> Path:
    """Write a tiny AutoencoderKL with save_pretrained into ``directory``; returns the path.

    ``dit_fast.vae.load_vae(str(path))`` loads it like a downloaded SD VAE directory.
    """
    directory = Path(directory)
    tiny_autoencoder(seed, **overrides).save_pretrained(directory)
    return directory
