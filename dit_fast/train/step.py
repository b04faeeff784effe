"""One DiT training step, as train.py runs it and benchmarks/table.py times it (one copy of the step).

    step = TrainStep.from_config(cfg, engine, ema, device, vae)   # what TrainLoop and the table do
    loss_sum = step.optimizer_step(batches)   # grad_accum micro-steps, then the EMA update

A micro-step is DiT's: t ~ randint(0, T) per sample, loss = training_losses(...)["loss"].mean(),
engine.backward, engine.step (DeepSpeed steps the optimizer at the accumulation boundary); the EMA
follows the fp32 master weights after every optimizer step (collective under ZeRO-3: every rank calls it).
"""
from __future__ import annotations

import torch

from .engine import engine_dtype


class TrainStep:
    """The micro-step and the optimizer step over a DeepSpeed engine and its EMA."""

    def __init__(self, engine, ema, diffusion, device: torch.device, precision: str, grad_accum: int,
                 vae=None):
        self.engine, self.ema, self.diffusion, self.vae = engine, ema, diffusion, vae
        self.device, self.grad_accum = device, grad_accum
        self.dtype = engine_dtype(precision)

    @classmethod
    def from_config(cls, cfg, engine, ema, device: torch.device, vae=None) -> "TrainStep":
        """The step of a resolved Config: DiT's diffusion (cfg.diffusion), precision and accumulation."""
        from ..diffusion import create_diffusion
        diffusion = create_diffusion(timestep_respacing=cfg.diffusion.timestep_respacing,
                                     noise_schedule=cfg.diffusion.noise_schedule,
                                     learn_sigma=cfg.model.learn_sigma,
                                     diffusion_steps=cfg.diffusion.diffusion_steps)
        return cls(engine, ema, diffusion, device, cfg.train.precision, cfg.train.grad_accum, vae)

    def model_fn(self, x, t, y):
        """The engine in its precision; t stays an integer timestep (never rounded to bf16)."""
        return self.engine(x.to(self.dtype), t, y).float()

    def micro_step(self, x, y) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)  # (N, C, h, w)
        y = y.to(self.device, non_blocking=True)  # (N,)
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.encode(x)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=self.device)
        loss = self.diffusion.training_losses(self.model_fn, x, t, dict(y=y))["loss"].mean()
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
