"""How an autoencoder's raw latents become what the DiT sees, and back: one object, used alike by
extraction, training (--data-path encodes on the fly), sampling, the export and evaluation.

Two modes:

- ``config`` (the default): the autoencoder config's ``scaling_factor`` and ``shift_factor``
  (diffusers AutoencoderKL; SD's VAEs: 0.18215 and no shift, DiT's formula bit for bit):
  ``z = (raw - shift) * scale`` on encode, ``raw = z / scale + shift`` on decode.
- ``channel`` (``extract_features.py --latent-norm channel``): the per-channel mean and standard
  deviation of the stored latents, measured at extraction: ``z = (raw - mean_c) / std_c``,
  ``raw = z * std_c + mean_c``.

Where it is recorded: the features' index.json (``latent_norm``), the run's saved config
(``data.latent_norm``), hence every checkpoint; ``sample.py --ckpt RUN`` decodes with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch

LATENT_NORMS = ("config", "channel")
# diffusers' AutoencoderKL default scaling_factor, which SD's VAEs (and DiT) use; a config that
# does not name one (the sd-vae-ft-* configs predate the field) means this.
SD_LATENT_SCALE = 0.18215


@dataclass(frozen=True)
class LatentNorm:
    """The normalisation of one latent space (see the module docstring for the formulas)."""

    mode: str
    """config | channel."""
    scale: Optional[float] = None
    """config: the autoencoder's scaling_factor."""
    shift: Optional[float] = None
    """config: its shift_factor (None or 0: no shift, so SD's formula stays bit for bit)."""
    mean: Optional[tuple] = None
    """channel: per-channel mean of the raw latents."""
    std: Optional[tuple] = None
    """channel: per-channel (population) standard deviation of the raw latents."""

    def __post_init__(self):
        check_latent_norm_mode(self.mode)
        if self.mode == "config":
            if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
                raise ValueError(f"latent normalisation 'config' needs a positive scaling_factor, "
                                 f"got {self.scale!r}")
            return
        if self.mean is None or self.std is None or len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("latent normalisation 'channel' needs a per-channel mean and std of the "
                             f"same length, got mean={self.mean!r}, std={self.std!r}")
        if not all(math.isfinite(m) for m in self.mean) or not all(
                math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"latent normalisation 'channel' needs finite means and positive stds, "
                             f"got mean={list(self.mean)}, std={list(self.std)}")

    @property
    def channels(self) -> Optional[int]:
        """Channels the statistics are for (None for config mode: any)."""
        return len(self.mean) if self.mode == "channel" else None

    @cached_property
    def _stats32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 (C, 1, 1) CPU tensors, made once (the dataset reads them per item)."""
        return tuple(torch.tensor(v, dtype=torch.float64).float().view(-1, 1, 1)
                     for v in (self.mean, self.std))

    def _per_channel(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-3] != len(self.mean):
            raise ValueError(f"latents have {z.shape[-3]} channels, the per-channel statistics "
                             f"{len(self.mean)}")
        mean, std = self._stats32  # (C, 1, 1): broadcasts over (..., C, h, w)
        return mean.to(z.device, z.dtype), std.to(z.device, z.dtype)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw autoencoder latents (..., C, h, w) -> what the DiT sees."""
        if self.mode == "config":
            # Python-float operands, as DiT's `* 0.18215`: the same float32 arithmetic, bit for bit.
            return (raw - self.shift) * self.scale if self.shift else raw * self.scale
        mean, std = self._per_channel(raw)
        return (raw - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """What the DiT produced -> raw autoencoder latents (the decoder's input)."""
        if self.mode == "config":
            # Divide (not multiply by the reciprocal) exactly as DiT's sample.py.
            return z / self.scale + self.shift if self.shift else z / self.scale
        mean, std = self._per_channel(z)
        return z * std + mean

    def to_dict(self) -> dict:
        """Plain JSON-safe dict (index.json, the run's config): only this mode's numbers."""
        if self.mode == "config":
            return {"mode": "config", "scale": float(self.scale),
                    "shift": float(self.shift) if self.shift else None}
        return {"mode": "channel", "mean": [float(v) for v in self.mean],
                "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: Optional[dict], where: str = "the config") -> Optional["LatentNorm"]:
        """Inverse of to_dict (None -> None); a record that claims a mode without its numbers is a
        ValueError naming ``where``."""
        if d is None:
            return None
        if not isinstance(d, dict) or d.get("mode") not in LATENT_NORMS:
            raise ValueError(f"{where}: latent_norm {d!r} is not a record of mode "
                             f"{' or '.join(LATENT_NORMS)}")
        try:
            if d["mode"] == "config":
                return cls("config", scale=d.get("scale"), shift=d.get("shift"))
            mean, std = d.get("mean"), d.get("std")
            return cls("channel", mean=tuple(mean) if mean is not None else None,
                       std=tuple(std) if std is not None else None)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}; extract the features again") from err

    @classmethod
    def from_vae_config(cls, config) -> "LatentNorm":
        """Config mode from an AutoencoderKL config (its ``scaling_factor`` and ``shift_factor``)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        scale = get("scaling_factor", None)
        return cls("config", scale=float(scale) if scale is not None else SD_LATENT_SCALE,
                   shift=get("shift_factor", None) or None)


def check_latent_norm_mode(mode: str) -> None:
    """ValueError unless ``mode`` is one of LATENT_NORMS (the --latent-norm choices)."""
    if mode not in LATENT_NORMS:
        raise ValueError(f"--latent-norm must be one of {', '.join(LATENT_NORMS)}, got {mode!r}")


def channel_stats(sums, sums_sq, count: int) -> LatentNorm:
    """Channel mode from fp64 sums over ``count`` values per channel: mean and population std."""
    if count <= 0:
        raise ValueError("no latents to measure per-channel statistics on")
    mean = [s / count for s in sums]
    var = [max(q / count - m * m, 0.0) for q, m in zip(sums_sq, mean)]
    return LatentNorm("channel", mean=tuple(mean), std=tuple(math.sqrt(v) for v in var))
