"""SiT's flow-matching samplers (dit_fast.transport's ODE and SDE) behind the one Sampler interface.

    sampler = build_sampler(model, transport, method="ode", sampling_method="dopri5", num_steps=50)
    x1 = sampler.sample(z, labels)       # z: the noise at t = 0; x1: the sample at t = 1

As SiT's sample.py: under guidance the state is the model batch [z, z] with labels [y, null], the
model function is ``drop_learned_sigma(forward_with_cfg)`` (the first three output channels guided,
all with guide_all_channels) and the sample is the first half of the last state; without guidance
``forward`` on z alone. The compiled function is that model call (static shapes); the transport's
loop runs eagerly around it. Fixed-step solvers (euler, midpoint, heun; SDE Euler, Heun) read no
device value per step; adaptive torchdiffeq solvers sync as they must to choose their steps.

The guidance interval's coordinate is SiT's t (0 = noise, 1 = data). For fixed-step methods the
model times are the same for every sample, so they are recorded once on the host by a dry run of
the loop on a 1-element state (``call_times``) and the guided or unguided step is chosen from that
list; an adaptive solver's times depend on the state and are read from t itself, clamped to [0, 1]:
torchdiffeq's dopri5 takes its last step past the end and interpolates back, so it calls the model at
times up to about 2; those calls belong to the step that ends the solve, and are guided as its end is
(without the clamp an interval reaching 1 left them unguided and changed the sample).
"""
from __future__ import annotations

import torch

from .base import Sampler, first_channels
from .guidance import Guidance

MODES = ("ODE", "SDE")
SDE_DEFAULT_METHOD, ODE_DEFAULT_METHOD = "Euler", "dopri5"  # SiT's sample.py defaults


def call_times(sample_fn) -> list[float]:
    """The model times (host floats) at which ``sample_fn`` calls its model, in order, from a dry
    run on a (1, 1, 1, 1) state whose model returns zeros (the RNG is restored afterwards)."""
    times: list[float] = []

    def recorder(x, t, **kwargs):
        times.append(float(t.reshape(-1)[0]))
        return torch.zeros_like(x)
    with torch.random.fork_rng(devices=[]):
        sample_fn(torch.zeros(1, 1, 1, 1), recorder)
    return times


class FlowSampler(Sampler):
    """``mode`` "ODE" (sample_ode) or "SDE" (sample_sde) of a Transport; options are SiT's flags."""

    def __init__(self, guidance: Guidance, transport, *, mode: str = "ODE", sampling_method=None,
                 num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3, reverse: bool = False,
                 diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step="Mean",
                 last_step_size: float = 0.04):
        from dit_fast.transport import Sampler as TransportSampler
        from dit_fast.transport.integrators import FIXED_STEP_METHODS, canonical_ode_method

        mode = str(mode).upper()
        if mode not in MODES:
            raise ValueError(f"--mode must be ODE or SDE, got {mode!r}")
        self.name, self.mode, self.num_steps = mode.lower(), mode, num_steps
        # The transport's model function: the first C channels (SiT drops the learned sigma).
        super().__init__(guidance, transport, first_channels(guidance.model.in_channels))
        sampler = TransportSampler(transport)
        if mode == "ODE":
            method = sampling_method or ODE_DEFAULT_METHOD
            self.fixed_step = canonical_ode_method(method) in FIXED_STEP_METHODS
            self._make = lambda noise_on_device: sampler.sample_ode(
                sampling_method=method, num_steps=num_steps, atol=atol, rtol=rtol, reverse=reverse)
        else:
            method = sampling_method or SDE_DEFAULT_METHOD
            self.fixed_step = True
            self._make = lambda noise_on_device: sampler.sample_sde(
                sampling_method=method, diffusion_form=diffusion_form, diffusion_norm=diffusion_norm,
                last_step=last_step, last_step_size=last_step_size, num_steps=num_steps,
                noise_on_device=noise_on_device)
        self.sampling_method = method
        probe = self._make(False)  # bad names and intervals fail here, before any model call
        self.times = call_times(probe) if self.fixed_step else None

    @property
    def num_model_evaluations(self) -> int:
        """Forward passes per sample (batched CFG forwards); adaptive solvers: those of the last call
        (-1 before the first)."""
        return len(self.times) if self.times is not None else self.last_model_calls

    last_model_calls = -1
    """Model calls of the last ``sample`` (a host counter; adaptive solvers choose their own)."""

    def _warmup_args(self, z_shape) -> tuple:
        x = self.guidance.double(torch.zeros(z_shape, device=self.device))
        y = self.guidance.labels(torch.zeros(z_shape[0], dtype=torch.int64))
        return x, torch.full((x.shape[0],), 0.5, device=self.device), y

    def _model(self):
        """model(x, t, y=...) for the transport: the guided or unguided compiled call per model time."""
        self.last_model_calls = 0
        if self.plain_step is None:
            pick = lambda t: self.step  # noqa: E731
        elif self.times is None:  # adaptive: the time is only known on the device
            pick = lambda t: self.step_at(min(max(float(t.reshape(-1)[0]), 0.0), 1.0))  # noqa: E731
        else:
            clock = iter(self.times)
            pick = lambda t: self.step_at(next(clock))  # noqa: E731

        def model(x, t, y):
            self.last_model_calls += 1
            return pick(t)(x, t, y)
        return model

    def _run(self, z, y, generator, progress) -> torch.Tensor:
        """The SDE's noise comes from the global RNG, as in SiT (from the CPU generator, moved, when
        eager; on the device when compiled, which needs no host copy per step); a ``generator`` seeds
        it for the call and the global RNG is restored afterwards."""
        x = self.guidance.double(z)
        compiled = self.step.fn is not self.step.eager
        sample_fn = self._make(compiled and self.device.type != "cpu")
        if generator is None or self.mode == "ODE":
            return self.guidance.cond_half(sample_fn(x, self._model(), y=y)[-1])
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.guidance.cond_half(sample_fn(x, self._model(), y=y)[-1])
