"""The frozen representation encoder of REPA: DINOv2 (with or without registers) through
``transformers``, REPA's preprocessing of the raw uint8 image and its patch tokens.

REPA loads DINOv2 from torch.hub and, once, resamples its 37 x 37 position table to the 16 x 16 grid
of a 224 px input (bicubic, antialiased, as timm's ``resample_abs_pos_embed``); we do the same at load,
so transformers' per-call interpolation (no antialiasing) never runs and the tokens are REPA's.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


def encoder_input_size(resolution: int) -> int:
    """Encoder input side for a ``resolution`` px image: 224 per 256 px (224 at 256, 448 at 512)."""
    if resolution <= 0 or resolution * 224 % 256 or resolution * 224 // 256 % 14:
        raise ValueError(f"image resolution {resolution} must be a positive multiple of 16 for DINOv2 "
                         "(224 px of input per 256 px of image, in 14 px patches)")
    return resolution * 224 // 256


def preprocess_raw_image(images: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """REPA's DINOv2 input: uint8 (N, 3, H, W) -> /255 -> ImageNet mean/std -> bicubic resize to
    ``encoder_input_size(resolution or W)``; float32 (N, 3, S, S).

    REPA normalises before resizing (bicubic weights sum to one, so the order changes only rounding).
    """
    side = encoder_input_size(resolution or images.shape[-1])
    mean, std = _imagenet_stats(images.device)
    x = (images.float() / 255.0 - mean) / std
    return F.interpolate(x, size=(side, side), mode="bicubic")


@functools.lru_cache(maxsize=None)
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (1, 3, 1, 1) tensors on ``device``, made once (not a host-to-device
    copy every training micro-step)."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def parse_enc_type(enc_type: str) -> tuple[bool, str]:
    """REPA's "--enc-type" for DINOv2: "dinov2-vit-b" or "dinov2reg-vit-b" (size s/b/l/g) ->
    (with registers, default hub id)."""
    parts = enc_type.split("-")
    if len(parts) != 3 or parts[0] not in ("dinov2", "dinov2reg") or parts[1] != "vit" \
            or parts[2] not in _SIZES:
        raise ValueError("--enc-type must be dinov2-vit-<s|b|l|g> or dinov2reg-vit-<s|b|l|g>, "
                         f"got {enc_type!r}")
    registers = parts[0] == "dinov2reg"
    hub_id = f"facebook/dinov2-{'with-registers-' if registers else ''}{_SIZES[parts[2]]}"
    return registers, hub_id


class DINOv2Encoder(nn.Module):
    """Frozen DINOv2: raw uint8 images (N, 3, H, W) -> patch tokens (N, T, D), T = (S / 14)^2, taken
    after the final LayerNorm with the class and register tokens dropped. Eval mode, no gradients;
    on CUDA it runs under bf16 autocast (REPA runs it under its mixed-precision autocast)."""

    def __init__(self, model: nn.Module, resolution: int = 256):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.resolution = resolution
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0))
        self.embed_dim = int(model.config.hidden_size)
        grid = encoder_input_size(resolution) // model.config.patch_size
        resample_positions(model, grid)
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)        # frozen: always eval

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess_raw_image(images, self.resolution)
        with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
            hidden = self.model(pixel_values=x).last_hidden_state    # (N, prefix + T, D), normed
        return hidden[:, self.num_prefix_tokens:]


@torch.no_grad()
def resample_positions(model: nn.Module, grid: int) -> None:
    """Resample the patch rows of ``model.embeddings.position_embeddings`` to a ``grid`` x ``grid``
    table (bicubic, antialiased, float32), keeping the class row; a no-op when it is that size."""
    table = model.embeddings.position_embeddings              # (1, 1 + side^2, D)
    patches = table[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side == grid:
        return
    square = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()   # (1, D, side, side)
    square = F.interpolate(square, size=(grid, grid), mode="bicubic", antialias=True)
    resized = square.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    table = torch.cat([table[:, :1], resized], dim=1)              # (1, 1 + grid^2, D)
    model.embeddings.position_embeddings = nn.Parameter(table).requires_grad_(False)
    model.config.image_size = grid * model.config.patch_size


def encoder_config(enc_type: str = "dinov2-vit-b", path_or_id: str | None = None):
    """The transformers config of the encoder ``load_encoder`` would load, checked against ``enc_type``
    (reads only config.json: cheap enough for a check before training starts)."""
    registers, hub_id = parse_enc_type(enc_type)
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise ImportError("REPA's encoder needs transformers: pip install 'dit-fast[repa]'") from err
    source = path_or_id or hub_id
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"--encoder {source!r}: no DINOv2 model there (a save_pretrained folder "
                                f"or a hub id): {str(err).splitlines()[0]}") from err
    want = "dinov2_with_registers" if registers else "dinov2"
    if config.model_type != want:
        raise ValueError(f"--encoder {source!r} holds a {config.model_type!r} model, but --enc-type {enc_type} "
                         f"needs {want!r}")
    return config


def load_encoder(enc_type: str = "dinov2-vit-b", path_or_id: str | None = None, *, resolution: int = 256,
                 device: torch.device | str = "cpu") -> DINOv2Encoder:
    """The frozen encoder of ``enc_type`` from a local save_pretrained folder or a hub id (default:
    facebook/dinov2-<size> or facebook/dinov2-with-registers-<size>). Needs ``pip install transformers``."""
    registers, hub_id = parse_enc_type(enc_type)
    encoder_config(enc_type, path_or_id)
    from transformers import Dinov2Model, Dinov2WithRegistersModel
    cls = Dinov2WithRegistersModel if registers else Dinov2Model
    model = cls.from_pretrained(path_or_id or hub_id).float()   # fp32 weights; bf16 from autocast on CUDA
    return DINOv2Encoder(model, resolution).to(device)
