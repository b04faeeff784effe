"""Gaussian diffusion as DiT trains and samples it: the forward process q, the model's reverse process p
with a learned-range variance, and the training losses (simple MSE plus the variational bound).

References: Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM: learned variance, hybrid loss).
The math is a handful of pure tensor functions; :class:`GaussianDiffusion` is a thin facade over them
with the original's method names, arguments and returned dict keys. Coefficients are looked up in
float64 on the timesteps' device and rounded once to float32, and every fp32 expression is evaluated in
the published code's order, so the same model, inputs and noise give the same numbers bit for bit.
"""
from __future__ import annotations

import math
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .steps import SamplingMixin
from .schedules import Schedule, at, schedule_from_betas


class ModelMeanType(Enum):
    """What the model's first C output channels predict (values as the original's enum.auto())."""
    PREVIOUS_X = 1    # x_{t-1} directly: not supported here
    START_X = 2       # x_0
    EPSILON = 3       # the noise added to x_0


class ModelVarType(Enum):
    """Where the variance of p(x_{t-1} | x_t) comes from. The learned types read C more output channels
    v in [-1, 1] and interpolate the log variance between log beta~_t (v = -1) and log beta_t (v = 1)."""
    LEARNED = 1
    FIXED_SMALL = 2     # the posterior variance beta~_t
    FIXED_LARGE = 3     # beta_t
    LEARNED_RANGE = 4


class LossType(Enum):
    MSE = 1             # ||eps - eps_theta||^2, plus the bound when the variance is learned
    RESCALED_MSE = 2    # the same with the bound term scaled by T / 1000
    KL = 3              # one term of the variational bound
    RESCALED_KL = 4     # that term times T: an estimate of the whole bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# -- the Gaussian algebra, as pure functions of per-step coefficients --------------------------------

def posterior_mean(coef1, coef2, x0, xt):
    """Mean of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 7)."""
    return coef1 * x0 + coef2 * xt


def x0_from_eps(xt, eps, sqrt_recip_abar, sqrt_recipm1_abar):
    """Invert x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps for x_0."""
    return sqrt_recip_abar * xt - sqrt_recipm1_abar * eps


def eps_from_x0(xt, x0, sqrt_recip_abar, sqrt_recipm1_abar):
    """Invert the same relation for eps."""
    return (sqrt_recip_abar * xt - x0) / sqrt_recipm1_abar


def interpolated_log_variance(v, min_log, max_log):
    """Nichol & Dhariwal eq. 15: v in [-1, 1] -> log variance between ``min_log`` and ``max_log``."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def vb_term_bits(x0, t, true_mean, true_log_var, model_mean, model_log_var):
    """One term of the bound, in bits per dimension, (N,): the decoder's negative log-likelihood of x_0
    where t = 0, else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var)
    return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)


class GaussianDiffusion(SamplingMixin):
    """Training and sampling of a Gaussian diffusion with the given betas (1-D, each in (0, 1]).

    The float64 tables of the original (``betas``, ``alphas_cumprod``, ``posterior_variance``, ...) are
    readable as numpy arrays. Models are called as ``model(x, t, **model_kwargs)`` and return (N, C, ...)
    or, with a learned variance, (N, 2C, ...); a tuple (output, extra) is accepted too.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, model_timesteps=None,
                 base_betas=None):
        if not isinstance(model_mean_type, ModelMeanType) or model_mean_type is ModelMeanType.PREVIOUS_X:
            raise ValueError(f"model_mean_type must be ModelMeanType.EPSILON or START_X, got {model_mean_type!r} "
                             "(DiT's sampler does not handle PREVIOUS_X)")
        if not isinstance(model_var_type, ModelVarType):
            raise ValueError(f"model_var_type must be a ModelVarType, got {model_var_type!r}")
        if not isinstance(loss_type, LossType):
            raise ValueError(f"loss_type must be a LossType, got {loss_type!r}")
        betas = np.array(betas, np.float64)      # our own float64 copy
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError(f"betas must lie in (0, 1]; got min {betas.min():g}, max {betas.max():g}")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.num_timesteps = len(betas)
        # The trained process's betas (before any respacing): diffusers' solvers are built from them.
        self.base_betas = betas if base_betas is None else np.array(base_betas, np.float64)
        self.schedule = schedule_from_betas(betas, model_timesteps)   # host copy, the source of truth
        self._schedules = {self.schedule.betas.device: self.schedule}

    def schedule_on(self, device: torch.device) -> Schedule:
        """The tables on ``device``, copied there once."""
        if device not in self._schedules:
            self._schedules[device] = self.schedule.to(device)
        return self._schedules[device]

    @property
    def learns_sigma(self) -> bool:
        # DiT interpolates for LEARNED as well as LEARNED_RANGE.
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    # -- calling the model --

    def _call(self, model, x, t, model_kwargs):
        """model(x, t', **model_kwargs) with t' the timesteps the model was trained on; (output, extra)."""
        model_t = self.schedule_on(t.device).model_timesteps[t].to(t.dtype)
        out = model(x, model_t, **(model_kwargs or {}))
        return out if isinstance(out, tuple) else (out, None)

    def _split(self, out, x):
        """The model output -> (mean part, variance values or None)."""
        if not self.learns_sigma:
            return out, None
        expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
        if tuple(out.shape) != expected:
            raise ValueError(f"with learned sigma the model must return 2*C channels {expected}, got "
                             f"{tuple(out.shape)}; build the model with learn_sigma=True or create the "
                             "diffusion with learn_sigma=False")
        return out.chunk(2, dim=1)

    # -- the forward process q --

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_t | x_0) as (mean, variance, log variance), each of x_start's shape."""
        s = self.schedule_on(t.device)
        mean = at(s.sqrt_alphas_cumprod, t, x_start) * x_start
        var = at(s.one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        return mean, var, at(s.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, noise ~ N(0, I) unless given; t (N,) int64."""
        noise = torch.randn_like(x_start) if noise is None else noise
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        s = self.schedule_on(t.device)
        signal = at(s.sqrt_alphas_cumprod, t, x_start) * x_start
        return signal + at(s.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor,
                                  t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x_0) as (mean, variance, clipped log variance), each of x_t's shape."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        s = self.schedule_on(t.device)
        mean = posterior_mean(at(s.posterior_mean_coef1, t, x_t), at(s.posterior_mean_coef2, t, x_t), x_start, x_t)
        var = at(s.posterior_variance, t, x_t).expand_as(x_t)
        return mean, var, at(s.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    # -- the reverse process p --

    def _variance(self, var_values, x, t):
        """(variance, log variance) of p(x_{t-1} | x_t), each of x's shape."""
        s = self.schedule_on(t.device)
        if var_values is not None:
            min_log, max_log = at(s.posterior_log_variance_clipped, t, x), at(s.log_betas, t, x)
            log_var = interpolated_log_variance(var_values, min_log, max_log)
            return torch.exp(log_var), log_var
        large = self.model_var_type is ModelVarType.FIXED_LARGE
        var = s.large_variance if large else s.posterior_variance
        log_var = s.large_log_variance if large else s.posterior_log_variance_clipped
        return at(var, t, x).expand_as(x), at(log_var, t, x).expand_as(x)

    def _x0_from_eps(self, x_t, t, eps):
        if x_t.shape != eps.shape:
            raise ValueError(f"model output (eps) shape {tuple(eps.shape)} != x shape {tuple(x_t.shape)}")
        s = self.schedule_on(t.device)
        recip, recipm1 = at(s.sqrt_recip_alphas_cumprod, t, x_t), at(s.sqrt_recipm1_alphas_cumprod, t, x_t)
        return x0_from_eps(x_t, eps, recip, recipm1)

    def _eps_from_x0(self, x_t, t, x0):
        s = self.schedule_on(t.device)
        recip, recipm1 = at(s.sqrt_recip_alphas_cumprod, t, x_t), at(s.sqrt_recipm1_alphas_cumprod, t, x_t)
        return eps_from_x0(x_t, x0, recip, recipm1)

    def _posterior_mean(self, x0, x_t, t):
        s = self.schedule_on(t.device)
        return posterior_mean(at(s.posterior_mean_coef1, t, x_t), at(s.posterior_mean_coef2, t, x_t), x0, x_t)

    def p_mean_variance(self, model, x: Tensor, t: Tensor, clip_denoised: bool = True, denoised_fn=None,
                        model_kwargs: dict | None = None) -> dict:
        """Run the model at (x, t) and return p(x_{t-1} | x_t) with the model's x_0 estimate.

        x (N, C, ...), t (N,). ``denoised_fn`` maps the x_0 estimate before the optional clip to [-1, 1].
        Returns {'mean', 'variance', 'log_variance', 'pred_xstart'} (each of x's shape) and 'extra'.
        """
        if tuple(t.shape) != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) (one timestep per sample), got {tuple(t.shape)}")
        out, extra = self._call(model, x, t, model_kwargs)
        out, var_values = self._split(out, x)
        var, log_var = self._variance(var_values, x, t)
        x0 = out if self.model_mean_type is ModelMeanType.START_X else self._x0_from_eps(x, t, out)
        x0 = x0 if denoised_fn is None else denoised_fn(x0)
        x0 = x0.clamp(-1, 1) if clip_denoised else x0
        return dict(mean=self._posterior_mean(x0, x, t), variance=var, log_variance=log_var, pred_xstart=x0,
                    extra=extra)

    def condition_mean(self, cond_fn, p_mean_var: dict, x: Tensor, t: Tensor, model_kwargs=None) -> Tensor:
        """The mean moved by variance * grad log p(y | x_t), cond_fn's output (Sohl-Dickstein et al. 2015)."""
        grad, _ = self._call(cond_fn, x, t, model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * grad.float()

    def condition_score(self, cond_fn, p_mean_var: dict, x: Tensor, t: Tensor, model_kwargs=None) -> dict:
        """p_mean_var with eps moved by -sqrt(1 - abar_t) * cond_fn's gradient (Song et al. 2020)."""
        abar = at(self.schedule_on(t.device).alphas_cumprod, t, x)
        grad, _ = self._call(cond_fn, x, t, model_kwargs)
        eps = self._eps_from_x0(x, t, p_mean_var["pred_xstart"]) - torch.sqrt(1 - abar) * grad
        x0 = self._x0_from_eps(x, t, eps)
        return {**p_mean_var, "pred_xstart": x0, "mean": self._posterior_mean(x0, x, t)}

    # -- losses --

    def _vb_bits(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """(one term of the bound in bits per dim (N,), the model's x_0 estimate)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        return vb_term_bits(x_start, t, true_mean, true_log_var, p["mean"], p["log_variance"]), p["pred_xstart"]

    def training_losses(self, model, x_start: Tensor, t: Tensor, model_kwargs: dict | None = None,
                        noise: Tensor | None = None) -> dict:
        """Losses of one noised sample per row: x_start (N, C, ...), t (N,) int64, noise (default drawn
        with randn_like). Returns {'loss': (N,)}, plus 'vb' (learned variance) and 'mse' for the MSE losses.

        The bound term sees the mean prediction detached: it trains only the variance channels.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        if self.loss_type.is_vb():
            bits, _ = self._vb_bits(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            return {"loss": bits * self.num_timesteps if self.loss_type is LossType.RESCALED_KL else bits}
        out, _ = self._call(model, x_t, t, model_kwargs)
        pred, var_values = self._split(out, x_t)
        vb = None if var_values is None else self._frozen_mean_vb(pred, var_values, x_start, x_t, t)
        target = x_start if self.model_mean_type is ModelMeanType.START_X else noise
        if pred.shape != target.shape:
            raise ValueError(f"model output shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        mse = mean_flat((target - pred) ** 2)
        if vb is None:
            return {"mse": mse, "loss": mse}
        return {"vb": vb, "mse": mse, "loss": mse + vb}

    def _frozen_mean_vb(self, pred, var_values, x_start, x_t, t):
        """The bound term of the hybrid loss, with the mean prediction detached (Nichol & Dhariwal sec. 3.1)."""
        frozen = torch.cat([pred.detach(), var_values], dim=1)
        bits, _ = self._vb_bits(lambda *_, **__: frozen, x_start, x_t, t, clip_denoised=False)
        # RESCALED_MSE: the bound summed over T steps would swamp the MSE; T / 1000 is the original's balance.
        return bits * (self.num_timesteps / 1000.0) if self.loss_type is LossType.RESCALED_MSE else bits

    def _prior_bits(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, (N,): fixed by the forward process alone."""
        t_last = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, t_last)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start: Tensor, clip_denoised: bool = True, model_kwargs=None) -> dict:
        """The whole variational bound in bits per dim, one fresh x_t per step from t = T-1 down to 0.
        Returns total_bpd and prior_bpd (N,), and per step (N, T), column 0 for t = T-1: vb, xstart_mse, mse."""
        per_step = {"vb": [], "xstart_mse": [], "mse": []}
        for step in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((x_start.shape[0],), step, device=x_start.device, dtype=torch.long)
            eps = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, eps)
            with torch.set_grad_enabled(False):
                bits, x0 = self._vb_bits(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            per_step["vb"].append(bits)
            per_step["xstart_mse"].append(mean_flat((x0 - x_start) ** 2))
            per_step["mse"].append(mean_flat((self._eps_from_x0(x_t, t, x0) - eps) ** 2))
        columns = {name: torch.stack(rows, dim=1) for name, rows in per_step.items()}
        prior = self._prior_bits(x_start)
        return {"total_bpd": columns["vb"].sum(dim=1) + prior, "prior_bpd": prior, **columns}


def _numpy_view(name: str) -> property:
    return property(lambda self: getattr(self.schedule, name).numpy(), doc=f"The float64 table {name}, (T,).")


# The original exposes its tables as numpy attributes (diffusion.betas, diffusion.alphas_cumprod, ...).
for _name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
              "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
              "posterior_mean_coef1", "posterior_mean_coef2"):
    setattr(GaussianDiffusion, _name, _numpy_view(_name))
