"""REPA's projector and the wrapper that feeds ``SILoss``: the DiT (its state-dict keys untouched) plus
one MLP per encoder applied to the tokens after block ``encoder_depth``."""
from __future__ import annotations

import torch
from torch import nn


def build_projector(hidden_size: int, projector_dim: int = 2048, z_dim: int = 768) -> nn.Sequential:
    """REPA's projector: Linear(hidden, projector_dim) -> SiLU -> Linear(projector_dim, projector_dim)
    -> SiLU -> Linear(projector_dim, z_dim), applied token-wise; (N, T, hidden) -> (N, T, z_dim).

    Initialised as REPA's SiT initialises every linear (it holds the projectors): Xavier-uniform
    weights, zero biases.
    """
    projector = nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim))
    for layer in projector:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return projector


class REPAModel(nn.Module):
    """``forward(x, t, y) -> (output, [projected tokens per encoder])``, the model ``SILoss`` calls.

    ``dit`` is any model whose ``forward(x, t, y, return_hidden_at=k)`` returns ``(output, hidden)``
    with hidden the (N, T, D) tokens after its first k blocks (dit_fast.models.DiT). t is passed on
    unchanged: REPA's t in [0, 1]. State-dict keys: ``dit.*`` (the DiT's own keys, so
    ``self.dit.state_dict()`` loads as a plain DiT/SiT) and ``projectors.<i>.*``.
    """

    def __init__(self, dit: nn.Module, projectors, encoder_depth: int = 8):
        super().__init__()
        depth = len(dit.blocks)
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, {depth}] (the model's depth), "
                             f"got {encoder_depth}")
        self.dit = dit
        self.projectors = nn.ModuleList(projectors)
        self.encoder_depth = encoder_depth

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        output, hidden = self.dit(x, t, y, return_hidden_at=self.encoder_depth)   # hidden (N, T, D)
        return output, [projector(hidden) for projector in self.projectors]        # each (N, T, Dz)
