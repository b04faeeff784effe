"""The transport: which path, what the network predicts, how the loss is weighted, and the time interval.

Written from the SiT paper (Ma et al. 2024, arXiv 2401.08740) and the stochastic interpolants paper
(Albergo, Boffi & Vanden-Eijnden 2023), keeping SiT's conventions so seeded runs give SiT's numbers:
t = 0 is noise and t = 1 data; a training step draws the noise ``x0 = randn_like(x1)`` first and then
``t = rand(N)`` from the default CPU generator, moved to x1's device and dtype afterwards.
"""
from __future__ import annotations

import enum
import math

import torch

from ..diffusion.losses import mean_flat   # the same per-sample mean as SiT's utils.mean_flat
from . import paths


# The members' order gives them SiT's values (1, 2, 3: what enum.auto() gives there).
ModelType = enum.Enum("ModelType", "NOISE SCORE VELOCITY", module=__name__)
ModelType.__doc__ = "What the network predicts: eps (NOISE), grad log p_t (SCORE) or d x_t / dt (VELOCITY)."
PathType = enum.Enum("PathType", "LINEAR GVP VP", module=__name__)
PathType.__doc__ = "Which interpolant: Linear, GVP or VP."
WeightType = enum.Enum("WeightType", "NONE VELOCITY LIKELIHOOD", module=__name__)
WeightType.__doc__ = ("How the score / noise loss is weighted over time: not at all, by (drift_var / sigma_t)^2 "
                      "(a velocity-scale loss) or by drift_var / sigma_t^2 (the likelihood weighting). The "
                      "velocity loss is never weighted.")


PATHS = {PathType.LINEAR: paths.LinearPath, PathType.GVP: paths.GVPPath, PathType.VP: paths.VPPath}


class Transport:
    """A path, a model type, a loss weighting and the eps that keep t away from singular ends.

    Build it with ``create_transport``; the attribute names are SiT's (``path_sampler``, ``model_type``,
    ``loss_type``, ``train_eps``, ``sample_eps``)."""

    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps):
        self.model_type, self.loss_type = model_type, loss_type
        self.path_type = path_type
        self.path_sampler = PATHS[path_type]()
        self.train_eps, self.sample_eps = train_eps, sample_eps

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) per sample: (N, ...) -> (N,)."""
        # The constant is formed in float32 from an integer tensor, as SiT forms it, so that the
        # log-likelihoods agree to the last bit.
        log_normaliser = -torch.tensor(z[0].numel()) / 2.0 * math.log(2 * math.pi)
        return log_normaliser - z.pow(2).flatten(1).sum(1) / 2.0

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False, reverse=False,
                       eval=False, last_step_size=0.0):
        """(t0, t1): the times a step may use (eps = sample_eps with ``eval``, else train_eps).

        VP stops eps short of data (sigma -> 0 there). On Linear/GVP, score and noise models are
        singular at both ends (1/t, 1/sigma) and stay eps inside [0, 1]; an SDE ends eps short of 1
        and starts at eps only with the "SBDM" diffusion, whose 1/t blows up at 0 (for a velocity
        model eps is 0 there, so SiT's default SDE gives NaN on Linear/GVP: SiT's sample.py uses
        "sigma"); a velocity ODE runs on all of [0, 1]. An SDE with a last step ends
        ``last_step_size`` before 1 instead. ``reverse`` maps the interval to 1 - t."""
        eps = sample_eps if eval else train_eps
        end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        t0, t1 = 0, 1
        if self.path_type == PathType.VP:
            t1 = end
        elif self.model_type != ModelType.VELOCITY or sde:
            starts_inside = (sde and diffusion_form == "SBDM") or self.model_type != ModelType.VELOCITY
            t0, t1 = (eps if starts_inside else 0), end
        return (1 - t0, 1 - t1) if reverse else (t0, t1)

    def sample(self, x1: torch.Tensor):
        """(t, x0, x1) for a training batch: noise first, then t, as SiT draws them."""
        noise = torch.randn_like(x1)
        lo, hi = self.check_interval(self.train_eps, self.sample_eps)
        # t is drawn on the CPU generator whatever x1's device (SiT's order and stream), then moved.
        t = torch.rand(len(x1)) * (hi - lo) + lo
        return t.to(x1), noise, x1

    def _loss_weight(self, xt, t):
        if self.loss_type == WeightType.NONE:
            return 1
        drift_var = self.path_sampler.score_drift(xt, t)[1]
        sigma = self.path_sampler.sigma(paths.expand_t_like_x(t, xt))[0]
        if self.loss_type == WeightType.VELOCITY:
            return (drift_var / sigma) ** 2
        if self.loss_type == WeightType.LIKELIHOOD:
            return drift_var / sigma ** 2
        raise NotImplementedError(f"loss weighting {self.loss_type}")

    def training_losses(self, model, x1, model_kwargs=None):
        """{"loss": (N,) per-sample loss, "pred": the model output} for a data batch x1 (N, C, H, W).

        model(x_t, t, **model_kwargs) must return x1's shape: wrap a learned-sigma DiT with
        ``drop_learned_sigma``. Velocity: |v - u_t|^2. Noise: w |eps_hat - x0|^2. Score:
        w |sigma_t s + x0|^2, i.e. the noise loss of -sigma_t s. The weight w is 1, (drift_var /
        sigma_t)^2 or drift_var / sigma_t^2 for loss_weight None, "velocity" or "likelihood"."""
        t, noise, data = self.sample(x1)
        t, xt, ut = self.path_sampler.interpolate(t, noise, data)
        pred = model(xt, t, **(model_kwargs or {}))
        check_model_output(pred, xt)
        kind = self.model_type
        if kind is ModelType.VELOCITY:
            return {"pred": pred, "loss": mean_flat((pred - ut) ** 2)}
        weight = self._loss_weight(xt, t)
        # A score s stands for the noise -sigma_t s: both losses compare a noise estimate with x0.
        error = pred - noise if kind is ModelType.NOISE else pred * self._sigma(t, xt) + noise
        return {"pred": pred, "loss": mean_flat(weight * error ** 2)}

    def _sigma(self, t, x):
        return self.path_sampler.sigma(paths.expand_t_like_x(t, x))[0]

    def velocity_and_score(self, output, x, t, *, need_score=True):
        """(probability-flow velocity, score or None) of x at times t (N,) from one model output."""
        path, kind = self.path_sampler, self.model_type
        if kind is ModelType.VELOCITY:
            return output, (path.score_from_velocity(output, x, t) if need_score else None)
        score = output / -self._sigma(t, x) if kind is ModelType.NOISE else output
        drift_mean, drift_var = path.score_drift(x, t)
        return -drift_mean + drift_var * score, score

    def get_drift(self):
        """drift(x, t, model, **model_kwargs): the probability-flow ODE's velocity field."""
        def drift(x, t, model, **model_kwargs):
            output = model(x, t, **model_kwargs)
            check_model_output(output, x)
            return self.velocity_and_score(output, x, t, need_score=False)[0]
        return drift

    def get_score(self):
        """score(x, t, model, **model_kwargs): grad log p_t(x) from whatever the model predicts."""
        def score_of(x, t, model, **model_kwargs):
            return self.velocity_and_score(model(x, t, **model_kwargs), x, t)[1]
        return score_of


def check_model_output(output, x):
    """Raise unless the model output has x's shape (a learned-sigma model returns twice its channels)."""
    if output.shape != x.shape:
        raise ValueError(f"the model returned {tuple(output.shape)} for x of {tuple(x.shape)}; a model with "
                         "learned sigma must be wrapped in drop_learned_sigma")
