"""Beta schedules, computed in float64 numpy exactly as ADM/DiT compute them.

Float64 matters: computing the schedule (or the respaced betas derived from alphas_cumprod) in
float32 moves respaced betas by ~1e-4 relative, which shows up in samples.
"""
import math

import numpy as np

NAMED_SCHEDULES = ("linear", "squaredcos_cap_v2")
_DEPRECATED_SCHEDULES = ("quad", "linear", "warmup10", "warmup50", "const", "jsd")


def _warmup_beta(beta_start, beta_end, num_diffusion_timesteps, warmup_frac):
    betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
    warmup_time = int(num_diffusion_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def get_beta_schedule(beta_schedule, *, beta_start, beta_end, num_diffusion_timesteps):
    """The older schedule API of the original ("quad", "linear", "warmup10", "warmup50", "const",
    "jsd"), kept for callers that use it. Returns a float64 array of shape (num_diffusion_timesteps,)."""
    n = num_diffusion_timesteps
    if beta_schedule == "quad":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "warmup10":
        return _warmup_beta(beta_start, beta_end, n, 0.1)
    if beta_schedule == "warmup50":
        return _warmup_beta(beta_start, beta_end, n, 0.5)
    if beta_schedule == "const":
        return beta_end * np.ones(n, dtype=np.float64)
    if beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        return 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    raise ValueError(
        f"unknown beta schedule {beta_schedule!r}; choose one of {', '.join(_DEPRECATED_SCHEDULES)}"
    )


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas: beta_i = 1 - a(t_{i+1}) / a(t_i),
    capped at max_beta to avoid the singularity at t = 1. Returns float64 (num_diffusion_timesteps,)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def _cosine_alpha_bar(t):
    # Nichol & Dhariwal's squared-cosine schedule with offset s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas of a named schedule: "linear" (Ho et al., rescaled by 1000 / T so that any step count
    gives a similar process) or "squaredcos_cap_v2" (cosine). Returns float64 (T,)."""
    if not isinstance(num_diffusion_timesteps, int) or num_diffusion_timesteps < 1:
        raise ValueError(
            f"diffusion_steps must be a positive int, got {num_diffusion_timesteps!r}"
        )
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        beta_end = scale * 0.02
        if beta_end > 1.0:
            raise ValueError(
                f"the linear schedule with diffusion_steps={num_diffusion_timesteps} would need "
                f"beta_end = 0.02 * 1000 / {num_diffusion_timesteps} = {beta_end:g} > 1; use at least "
                "20 diffusion steps or noise_schedule='squaredcos_cap_v2'"
            )
        return get_beta_schedule(
            "linear",
            beta_start=scale * 0.0001,
            beta_end=beta_end,
            num_diffusion_timesteps=num_diffusion_timesteps,
        )
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)
    raise ValueError(
        f"unknown noise_schedule {schedule_name!r}; choose one of {', '.join(NAMED_SCHEDULES)}"
    )
