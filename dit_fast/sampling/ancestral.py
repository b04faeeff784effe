"""DDPM (ancestral) and DDIM sampling by the diffusion's own step functions.

The per-step function is ``diffusion.p_sample`` / ``diffusion.ddim_sample`` (dit_fast.diffusion.steps)
with the guided model call and the step's noise drawn outside it, so it is one function of device
tensors (the schedule lives on the device: ``diffusion.schedule_on``) that can be compiled once with
static shapes. No coefficient is computed here: a change to the diffusion is a change in one place.

Eager fp32 sampling performs the original's operations in its order and draws random numbers in its
order (x_T, then one ``randn`` of the full model batch per step, the last included), so it gives
bit-identical samples to ``p_sample_loop`` for the same seed. The loop indexes a (S, B) tensor of
step indices made once: no host copies, no synchronisation per step.
"""
from __future__ import annotations

import torch

from .base import Sampler, with_progress
from .guidance import Guidance


class AncestralSampler(Sampler):
    """``method`` "ddpm" (ancestral, the original's) or "ddim" (``eta``, 0 = deterministic)."""

    def __init__(self, guidance: Guidance, diffusion, *, method: str = "ddpm", clip_denoised: bool = False,
                 eta: float = 0.0):
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"AncestralSampler runs ddpm or ddim, not {method!r}")
        if method == "ddpm" and eta:
            raise ValueError("eta is an option of ddim; ddpm's variance is the diffusion's")
        self.name = method
        step = diffusion.p_sample if method == "ddpm" else diffusion.ddim_sample
        extra = {} if method == "ddpm" else {"eta": eta}

        def make_step(model_call):
            def step_fn(x, t, y, noise):
                """x_{t-1} of the model batch x (B, ...) at step indices t (B,), labels y, noise like x."""
                out = step(model_call, x, t, clip_denoised=clip_denoised, model_kwargs={"y": y},
                           noise=noise, **extra)
                return out["sample"]
            return step_fn

        super().__init__(guidance, diffusion, make_step)
        # The device copy of the schedule is made here, eagerly: a compiled step then reads it as a
        # constant instead of tracing the host->device copy into its graph.
        diffusion.schedule_on(self.device)
        self._indices: dict[int, torch.Tensor] = {}
        # The original chain's timestep of each step index (the guidance interval's coordinate).
        self.chain_timesteps = diffusion.schedule_on(torch.device("cpu")).model_timesteps.tolist()

    @property
    def num_model_evaluations(self) -> int:
        return self.diffusion.num_timesteps

    def step_indices(self, batch: int) -> torch.Tensor:
        """(S, batch) int64 on the device, row k the step index of the k-th step (S-1 first)."""
        if batch not in self._indices:
            S = self.diffusion.num_timesteps
            order = torch.arange(S - 1, -1, -1, device=self.device)
            self._indices[batch] = order.view(S, 1).expand(S, batch).contiguous()
        return self._indices[batch]

    def _warmup_args(self, z_shape) -> tuple:
        x = self.guidance.double(torch.zeros(z_shape, device=self.device))
        y = self.guidance.labels(torch.zeros(z_shape[0], dtype=torch.int64))
        return x, self.step_indices(x.shape[0])[0], y, torch.zeros_like(x)

    def _run(self, z, y, generator, progress) -> torch.Tensor:
        x = self.guidance.double(z)
        indices = self.step_indices(x.shape[0])
        S = indices.shape[0]
        for k in with_progress(range(S), progress):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self.step_at(self.chain_timesteps[S - 1 - k])(x, indices[k], y, noise)
        return self.guidance.cond_half(x)  # drop the null-class half
