"""The one sampler interface: x_T and labels in, x_0 out; optionally compiled first.

    sampler = build_sampler(model, diffusion, method="ddpm", cfg_scale=4.0, num_classes=1000)
    sampler.compile(z.shape)                 # optional; returns compile seconds
    x0 = sampler.sample(z, labels)           # z (N, C, H, W) x_T, labels (N,) -> (N, C, H, W)

A method subclasses :class:`Sampler` and implements ``_run`` (the loop) and ``_warmup_args`` (one
call of its compiled function); the model is always called through ``self.guidance``. It hands the
base a ``make_step(model_call) -> step_fn``: the base builds the guided step from ``guidance`` and,
under a guidance interval, a second one from ``guidance.unguided`` (one forward of the conditional
half); ``self.step_at(t)`` picks per step from the step's model time known on the host, so
neither the choice nor a compiled step's static shapes ever need a device read.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .compiled import CompiledFn
from .guidance import Guidance


class Sampler:
    """Base of every sampling method (ancestral DDPM/DDIM, diffusers' solvers, ...)."""

    name = "sampler"

    def __init__(self, guidance: Guidance, diffusion, make_step):
        self.guidance = guidance
        self.diffusion = diffusion
        self.device = guidance.device
        self.step = CompiledFn(make_step(guidance), self.device)  # the per-step function, compiled on demand
        # Outside a guidance interval: the same step on one unguided forward (a second compiled
        # callable, so both keep static shapes).
        self.plain_step = (CompiledFn(make_step(guidance.unguided), self.device)
                           if guidance.interval_active else None)

    def step_at(self, t: float) -> CompiledFn:
        """The step to run at model time ``t`` (the objective's coordinate, a host number)."""
        return self.step if self.plain_step is None or self.guidance.guided_at(t) else self.plain_step

    # Kept as attributes of the sampler for callers that report them.
    @property
    def model(self):
        return self.guidance.model

    @property
    def compile_seconds(self) -> float:
        plain = self.plain_step.compile_seconds if self.plain_step is not None else 0.0
        return self.step.compile_seconds + plain

    @property
    def num_model_evaluations(self) -> int:
        """Model forward passes per sample (one batched CFG forward each)."""
        raise NotImplementedError(f"{type(self).__name__} does not say its model evaluations")

    def compile(self, z_shape, mode: Optional[str] = None, fullgraph: bool = True) -> float:
        """Compile the per-step function for x_T of shape ``z_shape`` (N, C, H, W) and warm it up.

        Returns the seconds spent (compilation plus warm-up), which sampling time excludes. The
        global RNG state is restored afterwards, so compiling never changes the samples.
        """
        args = self._warmup_args(tuple(z_shape))
        self.step.compile(args, mode, fullgraph)
        if self.plain_step is not None:
            self.plain_step.compile(args, mode, fullgraph)
        return self.compile_seconds

    def sample(self, z: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
               progress: bool = False) -> torch.Tensor:
        """Run the reverse process from x_T = z (N, C, H, W) for ``labels`` (N,); returns x_0.

        Noise comes from ``generator`` if given, else from the global RNG (as the original).
        """
        if labels.shape != (z.shape[0],):
            raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(labels.shape)}")
        with torch.set_grad_enabled(False):
            return self._run(z.float(), self.guidance.labels(labels), generator, progress)

    def _run(self, z, y, generator, progress) -> torch.Tensor:
        """The method's loop from x_T = z (N, ...) with model-batch labels y (2N under guidance) to x_0."""
        raise NotImplementedError(f"{type(self).__name__} has no sampling loop (_run)")

    def _warmup_args(self, z_shape) -> tuple:
        """Arguments of one call of the compiled per-step function for x_T of shape ``z_shape``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be compiled (_warmup_args)")


def with_progress(steps: Iterable, progress: bool, total: Optional[int] = None) -> Iterable:
    """``steps``, behind a tqdm bar when ``progress``."""
    if not progress:
        return steps
    from tqdm.auto import tqdm
    return tqdm(steps, total=total)
