"""Classifier-free guidance around a DiT: the one place that doubles the batch ([cond, null]), picks
the model call (``forward_with_cfg`` or ``forward``) and runs it under autocast.

Every sampler calls the model through a :class:`Guidance`. A guidance interval (``cfg_interval``,
Kynkaanniemi et al. 2024) guides only at model times inside [low, high]; outside it the sampler
calls :meth:`Guidance.unguided`: ONE forward of the conditional half (batch N, not 2N), its output
repeated so the model batch keeps its shape (the null half of the state is never read: the guided
forward, too, reads only x[:N]).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from dit_fast.config import PRECISION_DTYPES, PRECISIONS


def amp_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None for fp32: no autocast). ValueError if unknown."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return None if precision == "fp32" else PRECISION_DTYPES[precision]


def model_autocast(device_type: str, dtype: Optional[torch.dtype]):
    """The context a sampler's model call runs in: autocast to ``dtype``, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def check_null_label(model, num_classes: int, use_cfg: bool) -> None:
    """Guidance needs the null label (row num_classes of the label table): a model trained with
    class_dropout_prob=0 has none, and its CFG forward would fail with an IndexError deep inside."""
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    if use_cfg and table is not None and table.num_embeddings == num_classes:
        raise ValueError(f"this model has no null label ({num_classes} label rows for {num_classes} "
                         "classes: trained with class_dropout_prob=0), so classifier-free "
                         "guidance is impossible; sample without guidance (sample_ddp.py --cfg-scale 1)")


@dataclass
class Guidance:
    """How the model is called while sampling.

    use_cfg=True: the batch is [x, x] with labels [y, null] and the model runs ``forward_with_cfg``
    (what the original sample.py always does); use_cfg=False: ``forward`` on x alone.
    """

    model: torch.nn.Module
    num_classes: int
    cfg_scale: float = 4.0
    use_cfg: bool = True
    guide_all_channels: bool = False
    precision: str = "fp32"
    cfg_interval: Optional[tuple] = None
    """(low, high): guide only at model times in it (the objective's coordinate); None: always."""

    def __post_init__(self):
        check_null_label(self.model, self.num_classes, self.use_cfg)  # before any step, for every caller
        if self.cfg_interval is not None:
            low, high = map(float, self.cfg_interval)
            if not low <= high:
                raise ValueError(f"--cfg-interval LOW HIGH needs LOW <= HIGH, got {low} {high}")
            self.cfg_interval = (low, high)
        self.amp_dtype = amp_dtype(self.precision)
        self.device = next(self.model.parameters()).device

    def double(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, ...) -> the model batch (2N under guidance: the same x twice, the original's order)."""
        return torch.cat([x, x], 0) if self.use_cfg else x

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (N,) -> int64 on the device, followed by N null labels under guidance."""
        labels = labels.to(device=self.device, dtype=torch.int64)
        if not self.use_cfg:
            return labels
        return torch.cat([labels, torch.full_like(labels, self.num_classes)], 0)

    def cond_half(self, x: torch.Tensor) -> torch.Tensor:
        """The conditional half of a model batch (all of it without guidance)."""
        return x.chunk(2, dim=0)[0] if self.use_cfg else x

    @property
    def interval_active(self) -> bool:
        """Whether some steps may run unguided (an interval, and guidance at all)."""
        return self.use_cfg and self.cfg_interval is not None

    def guided_at(self, t: float) -> bool:
        """Whether the step at model time t (a host number) is guided; the interval is closed."""
        return not self.interval_active or self.cfg_interval[0] <= t <= self.cfg_interval[1]

    def unguided(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The conditional output for a model batch [x, x] / [y, null]: one forward of the first
        half (batch N), repeated to the batch's 2N rows; (B, C_out, H, W) fp32."""
        n = x.shape[0] // 2
        with model_autocast(self.device.type, self.amp_dtype):
            out = self.model.forward(x[:n], t[:n], y[:n])
        out = out.float()
        return torch.cat([out, out], 0)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model output (B, C_out, H, W) in fp32 for the model batch x (B, C, H, W), timesteps t
        and labels y (B,) (t: the trained timestep values the model sees)."""
        with model_autocast(self.device.type, self.amp_dtype):
            if self.use_cfg:
                out = self.model.forward_with_cfg(x, t, y, self.cfg_scale,
                                                  guide_all_channels=self.guide_all_channels)
            else:
                out = self.model.forward(x, t, y)
        return out.float()
