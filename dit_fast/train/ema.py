"""The fp32 EMA of the weights (DiT's update_ema), ZeRO-3 aware."""
from __future__ import annotations

import copy

import torch


class EMA:
    """fp32 exponential moving average of the weights, held by rank 0 only.

    Only rank 0 writes it to disk, so the other ranks save the memory (2.7 GB for DiT-XL/2).
    Under ZeRO-3 every rank joins the per-module parameter gathers (a collective); under ZeRO-0/1/2
    the working weights are replicated, so the update is local and free of communication.
    The update reads the engine's working weights (bf16 under --precision bf16), upcast to fp32.
    """

    def __init__(self, model: torch.nn.Module, decay: float, keep: bool, device: torch.device):
        self.decay = decay
        self.model = copy.deepcopy(model).to(device).float().requires_grad_(False).eval() \
            if keep else None

    @torch.no_grad()
    def update(self, module: torch.nn.Module, zero3: bool, decay: float | None = None) -> None:
        """ema = decay * ema + (1 - decay) * param, per parameter (DiT's update_ema)."""
        decay = self.decay if decay is None else decay
        ema_params = dict(self.model.named_parameters()) if self.model is not None else None
        for chunk in _param_chunks(module):
            if zero3:
                import deepspeed
                with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
                    self._lerp(chunk, ema_params, decay)
            else:
                self._lerp(chunk, ema_params, decay)

    @staticmethod
    def _lerp(chunk, ema_params, decay: float) -> None:
        if ema_params is None:
            return
        ema = [ema_params[name] for name, _ in chunk]
        src = [p.detach().to(e.device, torch.float32) for (_, p), e in zip(chunk, ema)]
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, src, alpha=1 - decay)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import load_into_model
        load_into_model(self.model, state)


def _param_chunks(module: torch.nn.Module):
    """Parameters grouped by top-level child (one DiT block at a time under ZeRO-3)."""
    prefix_groups: dict[str, list] = {}
    for name, p in module.named_parameters():
        head = name.split(".")[0]
        if head == "blocks":
            head = ".".join(name.split(".")[:2])
        prefix_groups.setdefault(head, []).append((name, p))
    return list(prefix_groups.values())
