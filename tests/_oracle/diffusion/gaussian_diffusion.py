"""The Gaussian diffusion of ADM (Dhariwal & Nichol) as DiT uses it: forward process, posterior,
model-output handling (learned-range sigma), training losses and the variational bound.

Numerics follow DiT's diffusion/gaussian_diffusion.py: schedules in float64, looked up at t and then
cast to float32 ("extract"), and every fp32 expression evaluated in the original's order, so that the
same model, inputs and noise give the original's numbers. Unlike the original, the float64 tables
live as tensors on the device of the timesteps (built once per device), so sampling loops make no
numpy -> device copies and no host syncs.
"""
import enum

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .samplers import SamplingMixin

_LN2 = float(np.log(2.0))


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}; not supported by DiT's sampler, refused here
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from. LEARNED_RANGE: the model outputs v in [-1, 1]
    per element, interpolating log(beta_t) (v = 1) and the clipped log posterior variance (v = -1)."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE (plus the vb term when the variance is learned)
    RESCALED_MSE = enum.auto()  # MSE plus vb * T / 1000
    KL = enum.auto()  # the variational bound only
    RESCALED_KL = enum.auto()  # the variational bound * T (estimates the full bound)

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def _schedule_arrays(betas: np.ndarray) -> dict:
    """All float64 per-timestep tables the diffusion needs, computed like the original."""
    T = betas.shape[0]
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    if T > 1:
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        # "Fixed large" uses beta_t, except at t = 0 where the posterior variance of t = 1 gives a
        # better decoder likelihood.
        fixed_large_variance = np.append(posterior_variance[1], betas[1:])
    else:
        # A one-step process has no t = 1 to clip to (the original fails here); use beta_0.
        posterior_log_variance_clipped = np.log(betas)
        fixed_large_variance = betas.copy()
    return {
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "alphas_cumprod_next": np.append(alphas_cumprod[1:], 0.0),
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "one_minus_alphas_cumprod": 1.0 - alphas_cumprod,
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        "fixed_large_variance": fixed_large_variance,
        "fixed_large_log_variance": np.log(fixed_large_variance),
    }


class GaussianDiffusion(SamplingMixin):
    """Training and sampling utilities for a Gaussian diffusion with the given betas.

    betas: 1-D array of per-step betas in (0, 1], index 0 = least noise. The numpy float64 tables
    (betas, alphas_cumprod, posterior_variance, ...) are public attributes as in the original.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        if not isinstance(model_mean_type, ModelMeanType) or model_mean_type == ModelMeanType.PREVIOUS_X:
            raise ValueError(
                f"model_mean_type must be ModelMeanType.EPSILON or START_X, got {model_mean_type!r} "
                "(DiT's sampler does not handle PREVIOUS_X)"
            )
        if not isinstance(model_var_type, ModelVarType):
            raise ValueError(f"model_var_type must be a ModelVarType, got {model_var_type!r}")
        if not isinstance(loss_type, LossType):
            raise ValueError(f"loss_type must be a LossType, got {loss_type!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)  # float64 for accuracy, as the original
        if betas.ndim != 1 or betas.shape[0] == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must lie in (0, 1]; got min {betas.min():g}, max {betas.max():g}"
            )
        self.num_timesteps = int(betas.shape[0])
        self._arrays = _schedule_arrays(betas)
        for name, arr in self._arrays.items():
            setattr(self, name, arr)
        self._device_tables = {}  # torch.device -> {name: float64 tensor}

    # ----------------------------------------------------------------------------------- tables
    def _tables_on(self, device: torch.device) -> dict:
        tables = self._device_tables.get(device)
        if tables is None:
            # MPS has no float64; casting first is exact for lookups since they end in .float().
            dtype = torch.float32 if device.type == "mps" else torch.float64
            tables = {k: torch.from_numpy(v).to(device=device, dtype=dtype) for k, v in self._arrays.items()}
            self._device_tables[device] = tables
        return tables

    def _extract(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        """Table `name` at timesteps t (N,): float64 lookup, then .float(), broadcast to `shape`
        (N, ...) without materialising (the original adds zeros of `shape`: same values)."""
        res = self._tables_on(t.device)[name][t].float()
        res = res.reshape(tuple(res.shape) + (1,) * (len(shape) - res.dim()))
        return res.expand(shape)

    def _wrap_model(self, model):
        """Hook for SpacedDiffusion, which maps respaced indices to original timesteps."""
        return model

    @property
    def _learns_sigma(self) -> bool:
        # DiT interpolates for LEARNED as well as LEARNED_RANGE (ADM used raw log-variances).
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    @staticmethod
    def _split_learned_output(model_output, x):
        B, C = x.shape[:2]
        expected = (B, C * 2, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"with learned sigma the model must return 2*C channels {expected}, got "
                f"{tuple(model_output.shape)}; build the model with learn_sigma=True or create the "
                "diffusion with learn_sigma=False"
            )
        return torch.split(model_output, C, dim=1)

    # ---------------------------------------------------------------------- forward process q
    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0): (mean, variance, log_variance), each of x_start's shape."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; t (N,) int64."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log variance), each of x_t's shape."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        posterior_mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        posterior_variance = self._extract("posterior_variance", t, x_t.shape)
        posterior_log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance

    # ------------------------------------------------------------------------ reverse process p
    def _model_variance(self, model_var_values, x, t):
        """(variance, log_variance) of p(x_{t-1} | x_t) for the configured variance type."""
        if self._learns_sigma:
            min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
            max_log = self._extract("log_betas", t, x.shape)
            frac = (model_var_values + 1) / 2  # [-1, 1] -> [min_var, max_var]
            model_log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(model_log_variance), model_log_variance
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            names = ("fixed_large_variance", "fixed_large_log_variance")
        else:
            names = ("posterior_variance", "posterior_log_variance_clipped")
        return self._extract(names[0], t, x.shape), self._extract(names[1], t, x.shape)

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        model(x, t, **model_kwargs) returns (N, C or 2C, ...) (or a tuple (output, extra)); x is
        (N, C, ...) at timesteps t (N,). denoised_fn is applied to the x_0 prediction before the
        optional clip to [-1, 1]. Returns a dict with 'mean', 'variance', 'log_variance',
        'pred_xstart' (all x's shape) and 'extra'.
        """
        model = self._wrap_model(model)
        if model_kwargs is None:
            model_kwargs = {}
        B = x.shape[0]
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must have shape ({B},) (one timestep per sample), got {tuple(t.shape)}")
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        model_var_values = None
        if self._learns_sigma:
            model_output, model_var_values = self._split_learned_output(model_output, x)
        model_variance, model_log_variance = self._model_variance(model_var_values, x, t)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        if x_t.shape != eps.shape:
            raise ValueError(
                f"model output (eps) shape {tuple(eps.shape)} != x shape {tuple(x_t.shape)}"
            )
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al. 2015 guidance)."""
        cond_fn = self._wrap_model(cond_fn)
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_variance's output with the score shifted by cond_fn (Song et al. 2020 guidance)."""
        cond_fn = self._wrap_model(cond_fn)
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------------------------- losses
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, the discretised decoder NLL of x_0 at t = 0. Returns {'output': (N,), 'pred_xstart'}."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2
        output = torch.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Losses for one timestep per sample.

        x_start (N, C, ...), t (N,) int64, noise like x_start (drawn with randn_like if None).
        Returns {'loss': (N,)} plus 'mse' and (learned sigma) 'vb' for the MSE loss types. The vb
        term sees the mean prediction detached, so it trains only the variance channels.
        """
        model = self._wrap_model(model)
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self._learns_sigma:
            model_output, model_var_values = self._split_learned_output(model_output, x_t)
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, **kwargs: frozen_out, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # /1000 for equivalence with the original implementation (the full-T vb would
                # otherwise swamp the MSE term).
                terms["vb"] *= self.num_timesteps / 1000.0
        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        if model_output.shape != target.shape:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} != target shape {tuple(target.shape)}"
            )
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, (N,); depends on the encoder only."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / _LN2

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The whole variational bound in bits per dim. Returns a dict with total_bpd (N,),
        prior_bpd (N,), and per-timestep (N, T) vb, xstart_mse and mse."""
        device, N = x_start.device, x_start.shape[0]
        t_rows = torch.arange(self.num_timesteps, device=device).view(-1, 1).expand(-1, N).contiguous()
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = t_rows[i]
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb, xstart_mse, mse = (torch.stack(v, dim=1) for v in (vb, xstart_mse, mse))
        prior_bpd = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}
