"""One DiT training step, as train.py runs it and benchmarks/table.py times it (one copy of the step).

    step = TrainStep.from_config(cfg, engine, ema, device, vae)   # what TrainLoop and the table do
    loss_sum = step.optimizer_step(batches)   # grad_accum micro-steps, then the EMA update

A micro-step is: loss = objective.loss(model_fn, x, y).mean() (objective.py: DiT's diffusion or SiT's
flow matching, chosen there and nowhere else), engine.backward, engine.step (DeepSpeed steps the optimizer at the accumulation boundary); the EMA
follows the fp32 master weights after every optimizer step (collective under ZeRO-3: every rank calls it).
"""
from __future__ import annotations

import torch

from .engine import engine_dtype


class TrainStep:
    """The micro-step and the optimizer step over a DeepSpeed engine and its EMA."""

    def __init__(self, engine, ema, objective, device: torch.device, precision: str, grad_accum: int,
                 vae=None):
        self.engine, self.ema, self.objective, self.vae = engine, ema, objective, vae
        self.device, self.grad_accum = device, grad_accum
        self.dtype = engine_dtype(precision)

    @classmethod
    def from_config(cls, cfg, engine, ema, device: torch.device, vae=None) -> "TrainStep":
        """The step of a resolved Config: its objective (train.objective), precision and accumulation."""
        from .objective import build_objective
        return cls(engine, ema, build_objective(cfg), device, cfg.train.precision, cfg.train.grad_accum, vae)

    def model_fn(self, x, t, y, **kwargs):
        """The engine in its precision; t stays as given (an integer timestep or fp32 flow time,
        never rounded to bf16). ``kwargs`` reach the model (``return_hidden_at=`` for REPA's tap),
        and every tensor it returns comes back in fp32."""
        out = self.engine(x.to(self.dtype), t, y, **kwargs)
        return out.float() if torch.is_tensor(out) else type(out)(o.float() for o in out)

    def micro_step(self, x, y) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)  # (N, C, h, w)
        y = y.to(self.device, non_blocking=True)  # (N,)
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.encode(x)
        loss = self.objective.loss(self.model_fn, x, y).mean()
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def optimizer_step(self, batches) -> torch.Tensor:
        """grad_accum micro-steps = one optimizer step; returns the summed micro losses."""
        total = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum):
            x, y = next(batches)
            total += self.micro_step(x, y)
        self.ema.update(self.engine)  # the fp32 master weights, every ZeRO stage (ema.py)
        return total
