"""Model callables as the transport sees them.

SiT's checkpoints (``SiT-XL-2-256x256.pt``) have DiT's keys and DiT's learned-sigma output layer: the
network returns 2C channels and SiT's model keeps only the first C (the velocity), discarding the
rest. Our ``DiT(learn_sigma=True)`` loads such a file strictly; wrap its ``forward`` or
``forward_with_cfg`` with ``drop_learned_sigma`` to get SiT's model function.
"""
from __future__ import annotations

from typing import Callable

import torch


def drop_learned_sigma(model_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn(x, t, **kwargs) -> model_fn(x, t, **kwargs)[:, :C] with C = x's channels.

    A model whose output already has x's channels passes through unchanged, so the wrapper is safe on
    either layout. With ``forward_with_cfg`` the guided channels are among the first C, as in SiT."""
    def first_half(x, t, **kwargs):
        prediction = model_fn(x, t, **kwargs)
        channels = x.shape[1]
        return prediction[:, :channels] if prediction.shape[1] == 2 * channels else prediction
    first_half.__wrapped__ = model_fn
    return first_half
