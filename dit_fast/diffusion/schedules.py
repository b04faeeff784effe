"""Noise schedules: the betas of a named schedule, and the per-timestep tables derived from them.

Everything is computed in float64 numpy and looked up in float64: a float32 schedule moves respaced
betas by ~1e-4 relative, which shows in the samples. Coefficients are rounded to float32 once, at lookup.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

NAMED_SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (T,) float64 of "linear" (Ho et al. 2020, with both ends scaled by 1000 / T so that any T
    gives a similar process) or "squaredcos_cap_v2" (the cosine schedule of Nichol & Dhariwal 2021)."""
    T = num_diffusion_timesteps
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"diffusion_steps must be a positive int, got {T!r}")
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(T, _cosine_alpha_bar)
    if schedule_name != "linear":
        raise ValueError(f"unknown noise_schedule {schedule_name!r}; choose one of {', '.join(NAMED_SCHEDULES)}")
    stretch = 1000 / T
    last = stretch * 0.02
    if last > 1.0:
        raise ValueError(f"the linear schedule with diffusion_steps={T} would need beta_end = 0.02 * 1000 / {T} "
                         f"= {last:g} > 1; use at least 20 diffusion steps or noise_schedule='squaredcos_cap_v2'")
    return get_beta_schedule("linear", beta_start=stretch * 0.0001, beta_end=last, num_diffusion_timesteps=T)


def _cosine_alpha_bar(s: float) -> float:
    # f(s) = cos^2(((s + 0.008) / 1.008) * pi / 2): the offset keeps beta_0 from being vanishingly small.
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas 1 - alpha_bar(s_{i+1}) / alpha_bar(s_i),
    s_i = i / T, each at most ``max_beta`` (alpha_bar(1) may be 0). Returns float64 (T,)."""
    T = num_diffusion_timesteps
    ratios = (alpha_bar((i + 1) / T) / alpha_bar(i / T) for i in range(T))
    return np.array([min(1 - r, max_beta) for r in ratios], dtype=np.float64)


def _warmup(start: float, end: float, T: int, fraction: float) -> np.ndarray:
    # A linear ramp over the first ``fraction`` of the steps, then flat at ``end``.
    betas = end * np.ones(T, dtype=np.float64)
    ramp = int(T * fraction)
    betas[:ramp] = np.linspace(start, end, ramp, dtype=np.float64)
    return betas


def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float,
                      num_diffusion_timesteps: int) -> np.ndarray:
    """The older schedule family ("quad", "linear", "warmup10", "warmup50", "const", "jsd"), float64 (T,)."""
    T, lo, hi = num_diffusion_timesteps, beta_start, beta_end
    makers = {
        "quad": lambda: np.linspace(lo ** 0.5, hi ** 0.5, T, dtype=np.float64) ** 2,   # linear in sqrt(beta)
        "linear": lambda: np.linspace(lo, hi, T, dtype=np.float64),
        "warmup10": lambda: _warmup(lo, hi, T, 0.1),
        "warmup50": lambda: _warmup(lo, hi, T, 0.5),
        "const": lambda: hi * np.ones(T, dtype=np.float64),
        "jsd": lambda: 1.0 / np.linspace(T, 1, T, dtype=np.float64),                   # 1/T, ..., 1/2, 1
    }
    if beta_schedule not in makers:
        raise ValueError(f"unknown beta schedule {beta_schedule!r}; choose one of {', '.join(makers)}")
    return makers[beta_schedule]()


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-timestep tables of a Gaussian diffusion, each a (T,) tensor, index 0 the least noisy step.

    Notation of Ho et al.: beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s <= t} alpha_s, and the posterior
    q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta~_t). Built once on the host
    (:func:`schedule_from_betas`) and copied once per device (:meth:`to`), so sampling makes no host copies.
    """

    betas: torch.Tensor
    log_betas: torch.Tensor                       # the upper end of the learned log-variance range
    alphas_cumprod: torch.Tensor                  # abar_t
    alphas_cumprod_prev: torch.Tensor             # abar_{t-1}, abar_{-1} = 1
    alphas_cumprod_next: torch.Tensor             # abar_{t+1}, abar_T = 0
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor       # x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor              # beta~_t; 0 at t = 0
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t, with t = 0 given t = 1's value
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    large_variance: torch.Tensor                  # "fixed large": beta_t, but beta~_1 at t = 0
    large_log_variance: torch.Tensor
    model_timesteps: torch.Tensor                 # int64: the timestep value the model is given at t

    def to(self, device: torch.device) -> "Schedule":
        """A copy on ``device``. MPS has no float64: there the tables are rounded to float32 up front, which
        gives the same coefficients since every lookup is rounded to float32 anyway."""
        real = torch.float32 if device.type == "mps" else torch.float64
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Schedule(**{name: table.to(device, real if table.is_floating_point() else table.dtype)
                           for name, table in moved.items()})


def schedule_from_betas(betas: np.ndarray, model_timesteps=None) -> Schedule:
    """Every table of :class:`Schedule` from float64 betas (T,); ``model_timesteps`` (default 0..T-1)
    are the timestep values the model is called with."""
    T = len(betas)
    alphas = 1 - betas
    abar = np.cumprod(alphas, axis=0)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta~_0 = 0 has no logarithm. With a single step there is no beta~_1 to borrow: use beta_0.
    post_var_floor = np.append(post_var[1], post_var[1:]) if T > 1 else betas
    large_var = np.append(post_var[1], betas[1:]) if T > 1 else betas.copy()
    tables = dict(
        betas=betas, log_betas=np.log(betas),
        alphas_cumprod=abar, alphas_cumprod_prev=abar_prev, alphas_cumprod_next=np.append(abar[1:], 0.0),
        sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        one_minus_alphas_cumprod=1.0 - abar, log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1),
        posterior_variance=post_var, posterior_log_variance_clipped=np.log(post_var_floor),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        large_variance=large_var, large_log_variance=np.log(large_var))
    steps = np.arange(T) if model_timesteps is None else np.asarray(model_timesteps)
    as_tensors = {name: torch.from_numpy(np.asarray(table, dtype=np.float64)) for name, table in tables.items()}
    return Schedule(**as_tensors, model_timesteps=torch.from_numpy(steps.astype(np.int64)))


def at(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] rounded to float32, shaped (N, 1, ..., 1) to broadcast against x (N, ...)."""
    return table[t].float().reshape(-1, *(1,) * (x.dim() - 1))
