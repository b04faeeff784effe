"""Interpolant paths x_t = alpha_t * x1 + sigma_t * x0 between noise x0 (t = 0) and data x1 (t = 1).

SiT's time runs the other way from DiT's diffusion: t = 0 is pure noise, t = 1 is data. Each path gives
alpha_t, sigma_t and their time derivatives; everything else follows from them:

- the velocity of the path, u_t = d_alpha_t * x1 + d_sigma_t * x0 (the regression target);
- the probability-flow velocity in terms of the score s = grad log p_t(x):
      v(x, t) = (d_alpha_t / alpha_t) * x + (d_alpha_t / alpha_t * sigma_t^2 - sigma_t * d_sigma_t) * s,
  which SiT writes as ``v = -drift_mean + drift_var * s`` (``compute_drift`` returns the pair);
- the conversions between velocity, score and noise (s = -eps / sigma_t) obtained by solving it.

SiT's method names (``transport.path_sampler.compute_alpha_t`` and so on) answer too, so code that
reaches into a SiT path keeps working. Constants: VP uses beta_min = 0.1, beta_max = 20 (SiT's sigma_min and
sigma_max), the usual VP-SDE values of Song et al. 2021.
"""
from __future__ import annotations

import math

import torch

DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
# SiT's own spelling of the last form (a typo) is accepted too, so its flag values keep working.
_FORM_ALIASES = {"inccreasing-decreasing": "increasing-decreasing"}


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (N,) viewed as (N, 1, ..., 1) so it broadcasts against x (N, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


_per_sample = expand_t_like_x

# SiT's method name -> ours.
_SIT_NAMES = {"compute_alpha_t": "alpha", "compute_sigma_t": "sigma",
              "compute_d_alpha_alpha_ratio_t": "d_log_alpha",
              "compute_drift": "score_drift", "compute_diffusion": "diffusion_coefficient",
              "get_score_from_velocity": "score_from_velocity", "get_noise_from_velocity": "noise_from_velocity",
              "get_velocity_from_score": "velocity_from_score", "compute_mu_t": "point", "compute_xt": "point",
              "compute_ut": "path_velocity", "plan": "interpolate"}


class LinearPath:
    """alpha_t = t, sigma_t = 1 - t: the straight line of rectified flow / SiT's "Linear"."""

    def __getattr__(self, name):
        if name in _SIT_NAMES:
            return getattr(self, _SIT_NAMES[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def alpha(self, t):
        """(alpha_t, d alpha_t / dt): the data coefficient and its rate."""
        return t, 1

    def sigma(self, t):
        """(sigma_t, d sigma_t / dt): the noise coefficient and its rate."""
        return 1 - t, -1

    def d_log_alpha(self, t):
        """d_alpha_t / alpha_t, written per path where the plain quotient would lose precision."""
        return 1 / t

    def score_drift(self, x, t):
        """(drift_mean, drift_var) with v = -drift_mean + drift_var * score; t is (N,)."""
        t = _per_sample(t, x)
        rate = self.d_log_alpha(t)
        sigma, d_sigma = self.sigma(t)
        return -(rate * x), rate * sigma ** 2 - sigma * d_sigma

    def diffusion_coefficient(self, x, t, form="constant", norm=1.0):
        """The SDE's diffusion coefficient w_t (the SDE adds w_t * score to the drift and noise of
        variance 2 * w_t * dt). ``form`` is one of DIFFUSION_FORMS; ``norm`` scales it."""
        form = _FORM_ALIASES.get(form, form)
        tt = _per_sample(t, x)
        if form == "constant":
            # SiT returns the bare float here, which its sqrt then rejects; a tensor works everywhere.
            return torch.full_like(tt, norm)
        if form == "SBDM":
            return norm * self.score_drift(x, tt)[1]
        if form == "sigma":
            return norm * self.sigma(tt)[0]
        if form == "linear":
            return norm * (1 - tt)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * tt) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * tt) ** 2
        raise NotImplementedError(f"diffusion form {form!r} is not one of {', '.join(DIFFUSION_FORMS)}")

    def _solve_for_score_direction(self, velocity, x, t):
        # v = (d_alpha / alpha) (x + (sigma^2 - (alpha / d_alpha) sigma d_sigma) s); returns
        # (alpha / d_alpha) v - x, the coefficient's ingredients and sigma.
        alpha, d_alpha = self.alpha(t)
        inv_rate = alpha / d_alpha
        sigma, d_sigma = self.sigma(t)
        return inv_rate * velocity - x, inv_rate, sigma, d_sigma

    def score_from_velocity(self, velocity, x, t):
        """Score from a velocity: solve v = (d_alpha / alpha) x + (d_alpha / alpha sigma^2 - sigma d_sigma) s."""
        lhs, inv_rate, sigma, d_sigma = self._solve_for_score_direction(velocity, x, _per_sample(t, x))
        return lhs / (sigma ** 2 - inv_rate * d_sigma * sigma)

    def noise_from_velocity(self, velocity, x, t):
        """Noise eps from a velocity: the same equation with s = -eps / sigma."""
        lhs, inv_rate, sigma, d_sigma = self._solve_for_score_direction(velocity, x, _per_sample(t, x))
        return lhs / (inv_rate * d_sigma - sigma)

    def velocity_from_score(self, score, x, t):
        """Velocity from a score: -drift_mean + drift_var * score."""
        drift_mean, drift_var = self.score_drift(x, _per_sample(t, x))
        return drift_var * score - drift_mean

    def point(self, t, x0, x1):
        """x_t = alpha_t x1 + sigma_t x0 for noise x0, data x1 and times t (N,)."""
        tt = _per_sample(t, x1)
        return self.alpha(tt)[0] * x1 + self.sigma(tt)[0] * x0

    def path_velocity(self, t, x0, x1, xt=None):
        """u_t = d_alpha_t x1 + d_sigma_t x0 (xt unused; SiT's signature has it)."""
        tt = _per_sample(t, x1)
        return self.alpha(tt)[1] * x1 + self.sigma(tt)[1] * x0

    def interpolate(self, t, x0, x1):
        """(t, x_t, u_t) for a batch of noise x0, data x1 and times t (N,)."""
        return t, self.point(t, x0, x1), self.path_velocity(t, x0, x1)


class GVPPath(LinearPath):
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2): variance preserving, alpha^2 + sigma^2 = 1."""

    def alpha(self, t):
        angle = t * (math.pi / 2)
        return torch.sin(angle), math.pi / 2 * torch.cos(angle)

    def sigma(self, t):
        angle = t * (math.pi / 2)
        return torch.cos(angle), -math.pi / 2 * torch.sin(angle)

    def d_log_alpha(self, t):
        return math.pi / (2 * torch.tan(t * (math.pi / 2)))


class VPPath(LinearPath):
    """The VP-SDE's marginals in SiT's time: with s = 1 - t the diffusion time and
    beta(s) = beta_min + s (beta_max - beta_min), alpha_t = exp(-1/2 int_0^s beta) and
    sigma_t = sqrt(1 - alpha_t^2)."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        # SiT's names for beta_min and beta_max.
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def _log_alpha(self, t):
        s = 1 - t
        return -0.25 * s ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * s * self.sigma_min

    def d_log_alpha(self, t):
        # d/dt log alpha_t = beta(1 - t) / 2.
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t):
        value = torch.exp(self._log_alpha(t))
        return value, value * self.d_log_alpha(t)

    def sigma(self, t):
        alpha_sq = torch.exp(2 * self._log_alpha(t))
        value = torch.sqrt(1 - alpha_sq)
        # d sigma / dt = -alpha * d_alpha / sigma = alpha^2 * (2 d log alpha) / (-2 sigma).
        return value, alpha_sq * (2 * self.d_log_alpha(t)) / (-2 * value)

    def score_drift(self, x, t):
        # For a VP path drift_var = beta / 2 exactly (alpha^2 + sigma^2 = 1), written directly.
        beta = self.sigma_min + (1 - _per_sample(t, x)) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta * x, beta / 2


# SiT's class names, for code that builds a path directly.
ICPlan, GVPCPlan, VPCPlan = LinearPath, GVPPath, VPPath
