"""REPA's samplers (Yu et al. 2025) behind the one Sampler interface, in REPA's time convention.

    sampler = build_sampler(model, "linear", method="repa-sde", num_steps=250, cfg_scale=1.8,
                            cfg_interval=(0.0, 0.7))
    x0 = sampler.sample(z, labels)        # z: the noise at t = 1; x0: the sample at t = 0

REPA's SiT regresses the velocity of x_t = alpha_t x + sigma_t eps with the DATA at t = 0 and the
noise at t = 1 (linear: alpha, sigma = 1 - t, t; cosine: cos, sin of pi t / 2), the opposite of SiT's.
The methods are REPA's generate.py choices, from the paper's equations:

- "repa-sde" (its Euler-Maruyama, the paper's FID setting): times linspace(1, 0.04, N) then 0. With
  the score s = (r v - x) / (sigma^2 - r d_sigma sigma), r = alpha / d_alpha, and the diffusion
  coefficient w_t = 2 t, the reverse drift is d = v - t s; each of the first N - 1 steps is
  x += d dt + sqrt(2 t |dt|) eps, and the last (0.04 -> 0) is the mean step x += d dt without noise.
  N model calls.
- "repa-ode" (its Euler, optionally Heun): times linspace(1, 0, N + 1), x += v dt; Heun averages the
  slope at t_next (not after the last step), guided or not as at t_cur.

Guidance is REPA's: on every channel (its velocity has only the latent's channels; guiding the
velocity equals guiding REPA's drift, which is affine in it with the same x in both halves), on
the closed interval [low, high] of REPA's t (``cfg_interval``), one unguided conditional forward
elsewhere. The state is float64 and the model batch the same 2N rows [z, z] / [y, null] REPA's
generate.py uses, so the SDE noise, drawn in float64 like the state, is REPA's draw for a seed.

The compiled function is the model call (static shapes); the step's arithmetic runs eagerly with
host-side coefficients: nothing is read back from the device per step.
"""
from __future__ import annotations

import math

import torch

from dit_fast.config import REPA_PATH_TYPES as PATH_TYPES

from .base import Sampler, first_channels, with_progress
from .guidance import Guidance

MODES = ("SDE", "ODE")
SDE_LAST_T = 0.04  # REPA's Euler-Maruyama stops its noisy steps here; one mean step to t = 0


def interpolant(path_type: str, t: float) -> tuple[float, float, float, float]:
    """(alpha_t, sigma_t, d alpha / dt, d sigma / dt) of REPA's path at a host time t."""
    if path_type == "linear":
        return 1.0 - t, t, -1.0, 1.0
    if path_type == "cosine":
        half = t * math.pi / 2
        return math.cos(half), math.sin(half), -math.pi / 2 * math.sin(half), math.pi / 2 * math.cos(half)
    raise ValueError(f"REPA's path type must be one of {PATH_TYPES}, got {path_type!r}")


def drift_coefficients(path_type: str, t: float) -> tuple[float, float]:
    """(a, b) with the reverse-SDE drift d = a v + b x at time t (w_t = 2 t):
    d = v - t s, s = (r v - x) / var, r = alpha / d_alpha, var = sigma^2 - r d_sigma sigma."""
    alpha, sigma, d_alpha, d_sigma = interpolant(path_type, t)
    ratio = alpha / d_alpha
    var = sigma ** 2 - ratio * d_sigma * sigma
    return 1.0 - t * ratio / var, t / var


def time_grid(mode: str, num_steps: int) -> list[float]:
    """REPA's times (host float64): SDE linspace(1, 0.04, N) + [0]; ODE linspace(1, 0, N + 1)."""
    if mode == "SDE":
        return torch.linspace(1.0, SDE_LAST_T, num_steps, dtype=torch.float64).tolist() + [0.0]
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()


class RepaSampler(Sampler):
    """REPA's Euler-Maruyama SDE ("SDE") or Euler / Heun ODE ("ODE") sampler of a REPA-trained model."""

    def __init__(self, guidance: Guidance, path_type: str = "linear", *, mode: str = "SDE",
                 num_steps: int = 250, heun: bool = False):
        mode = str(mode).upper()
        if mode not in MODES:
            raise ValueError(f"REPA's sampler mode must be SDE or ODE, got {mode!r}")
        if path_type not in PATH_TYPES:
            raise ValueError(f"REPA's path type must be one of {PATH_TYPES}, got {path_type!r}")
        if num_steps < (2 if mode == "SDE" else 1):
            raise ValueError(f"REPA's {mode} sampler needs at least {2 if mode == 'SDE' else 1} steps, "
                             f"got {num_steps}")
        if heun and mode == "SDE":
            raise ValueError("heun is an option of REPA's ODE sampler, not of its SDE sampler")
        guidance.guide_all_channels = True  # REPA guides the whole velocity
        super().__init__(guidance, path_type, first_channels(guidance.model.in_channels))
        self.name, self.mode, self.path_type = f"repa-{mode.lower()}", mode, path_type
        self.num_steps, self.heun = num_steps, heun
        self.times = time_grid(mode, num_steps)

    @property
    def num_model_evaluations(self) -> int:
        if self.mode == "SDE":
            return self.num_steps
        return self.num_steps + (self.num_steps - 1 if self.heun else 0)

    def _warmup_args(self, z_shape) -> tuple:
        x = self.guidance.double(torch.zeros(z_shape, device=self.device))
        y = self.guidance.labels(torch.zeros(z_shape[0], dtype=torch.int64))
        return x, torch.full((x.shape[0],), 0.5, device=self.device), y

    def _velocity(self, x: torch.Tensor, t: float, y: torch.Tensor, guided_at: float) -> torch.Tensor:
        """The (guided) velocity, float64, of the float64 state x at time t; guidance as at guided_at."""
        time = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        return self.step_at(guided_at)(x.float(), time, y).double()

    def _noise(self, x: torch.Tensor, generator) -> torch.Tensor:
        if generator is None:
            return torch.randn_like(x)  # REPA's draw: the state's shape and dtype, on its device
        return torch.randn(x.shape, dtype=x.dtype, generator=generator,
                           device=generator.device).to(x.device)

    def _run(self, z, y, generator, progress) -> torch.Tensor:
        x = self.guidance.double(z).double()
        pairs = list(zip(self.times[:-1], self.times[1:]))
        for i, (t_cur, t_next) in enumerate(with_progress(pairs, progress)):
            dt = t_next - t_cur
            if self.mode == "ODE":
                x = self._ode_step(x, y, t_cur, t_next, i)
                continue
            last = i == len(pairs) - 1
            noise = None if last else self._noise(x, generator)    # drawn before the model call, as REPA
            a, b = drift_coefficients(self.path_type, t_cur)
            drift = a * self._velocity(x, t_cur, y, t_cur) + b * x
            x = x + drift * dt if last else x + drift * dt + math.sqrt(2 * t_cur * abs(dt)) * noise
        return self.guidance.cond_half(x).float()

    def _ode_step(self, x, y, t_cur: float, t_next: float, i: int) -> torch.Tensor:
        dt = t_next - t_cur
        slope = self._velocity(x, t_cur, y, t_cur)
        x_next = x + dt * slope
        if self.heun and i < self.num_steps - 1:
            slope_next = self._velocity(x_next, t_next, y, t_cur)
            x_next = x + dt * (0.5 * slope + 0.5 * slope_next)
        return x_next
