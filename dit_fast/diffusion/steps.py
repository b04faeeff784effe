"""Reverse-process samplers: ancestral DDPM steps (Ho et al. 2020, Algorithm 2) and DDIM steps (Song et
al. 2020, eq. 12, with eta), each a pure function of per-step coefficients, and the loops that run them.

Random numbers are drawn in the published order, so a seeded run gives the published samples: x_T =
randn(*shape), then one randn_like(x) per step, after the model call, at t = 0 as well. The timesteps of
every step are one (T, N) tensor made on the device before the loop: no host copies, no syncs per step.
"""
from __future__ import annotations

import collections

import torch

from .schedules import at


def _noise_gate(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, 1, ..., 1): 1.0 where t > 0, 0.0 at t = 0, where the last step adds no noise."""
    return (t != 0).float().reshape(-1, *(1,) * (x.dim() - 1))


def ancestral_step(mean, log_variance, noise, gate):
    """x_{t-1} = mean + sigma_t * z, sigma_t = exp(log_variance / 2), gated off at t = 0."""
    return mean + gate * torch.exp(0.5 * log_variance) * noise


def ddim_sigma(eta, abar, abar_prev):
    """sigma_t(eta) = eta * sqrt((1 - abar_{t-1}) / (1 - abar_t)) * sqrt(1 - abar_t / abar_{t-1}) (Song et
    al. eq. 16): eta = 0 is the deterministic DDIM, eta = 1 has DDPM's posterior variance."""
    return eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)


def ddim_step(x0, eps, abar_prev, sigma, noise, gate):
    """x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z."""
    towards_xt = torch.sqrt(1 - abar_prev - sigma ** 2) * eps
    return x0 * torch.sqrt(abar_prev) + towards_xt + gate * sigma * noise


def ddim_reverse_step(x0, eps, abar_next):
    """The deterministic DDIM update run forwards in time: x_{t+1} from the x_0 and eps estimates."""
    return x0 * torch.sqrt(abar_next) + torch.sqrt(1 - abar_next) * eps


def _final_sample(steps) -> torch.Tensor:
    # Drain a progressive loop keeping only the newest step's tensors alive.
    return collections.deque(steps, maxlen=1).pop()["sample"]


def _with_progress_bar(steps):
    from tqdm.auto import tqdm   # only needed with progress=True
    return tqdm(steps)


def _sampling_device(model, noise, device) -> torch.device:
    """The device asked for, else the model's parameters' device, else the starting noise's device."""
    if device is not None:
        return torch.device(device)
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    # A plain function (e.g. a bound forward_with_cfg) has no parameters: then the noise tells.
    found = first if first is not None else noise
    if found is not None:
        return found.device
    raise ValueError("cannot tell which device to sample on: pass device=... (the model has no parameters and "
                     "no noise was given)")


class SamplingMixin:
    """The sampling half of GaussianDiffusion (uses its p_mean_variance, condition_*, tables)."""

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 *, noise=None):
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t). Returns {'sample', 'pred_xstart'}.

        ``noise`` (an extension): a pre-drawn randn_like(x), e.g. for a compiled step whose own draws
        would differ from eager ones; None draws it here, right after the model call.
        """
        p = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 model_kwargs=model_kwargs)
        z = torch.randn_like(x) if noise is None else noise
        mean = p["mean"] if cond_fn is None else self.condition_mean(cond_fn, p, x, t, model_kwargs=model_kwargs)
        x_prev = ancestral_step(mean, p["log_variance"], z, _noise_gate(t, x))
        return {"sample": x_prev, "pred_xstart": p["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, *, noise=None):
        """One DDIM step x_t -> x_{t-1}; eps is re-derived from the (maybe clipped) x_0 estimate, whatever
        the model predicts. Returns {'sample', 'pred_xstart'}; ``noise`` as in p_sample."""
        p = self._guided_p(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        x0 = p["pred_xstart"]
        eps = self._eps_from_x0(x, t, x0)
        s = self.schedule_on(t.device)
        abar, abar_prev = at(s.alphas_cumprod, t, x), at(s.alphas_cumprod_prev, t, x)
        sigma = ddim_sigma(eta, abar, abar_prev)
        z = torch.randn_like(x) if noise is None else noise     # drawn even when eta = 0
        return {"sample": ddim_step(x0, eps, abar_prev, sigma, z, _noise_gate(t, x)), "pred_xstart": x0}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                            model_kwargs=None, eta=0.0):
        """One deterministic DDIM step forwards, x_t -> x_{t+1}. Returns {'sample', 'pred_xstart'}."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is the deterministic ODE: eta must be 0.0, got {eta}")
        p = self._guided_p(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        x0 = p["pred_xstart"]
        abar_next = at(self.schedule_on(t.device).alphas_cumprod_next, t, x)
        return {"sample": ddim_reverse_step(x0, self._eps_from_x0(x, t, x0), abar_next), "pred_xstart": x0}

    def _guided_p(self, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs) -> dict:
        """p_mean_variance, its score shifted by ``cond_fn`` when there is one (the DDIM samplers')."""
        p = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                 model_kwargs=model_kwargs)
        return p if cond_fn is None else self.condition_score(cond_fn, p, x, t, model_kwargs=model_kwargs)

    # -- loops from x_T down to x_0 --

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False):
        """Ancestral sampling of a batch of ``shape`` (N, C, H, W); returns x_0.

        ``noise`` is x_T (default randn(*shape) on ``device``); ``device`` defaults to the model's;
        ``progress`` shows a tqdm bar.
        """
        return _final_sample(self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress))

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False):
        """p_sample_loop, yielding p_sample's dict at every step, t = T-1 first."""
        yield from self._run_reverse(self.p_sample, model, shape, noise, device, progress,
                                     clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                                     model_kwargs=model_kwargs)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0):
        """DDIM sampling; the arguments of p_sample_loop plus ``eta``. Returns x_0."""
        return _final_sample(self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta))

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        """ddim_sample_loop, yielding ddim_sample's dict at every step."""
        yield from self._run_reverse(self.ddim_sample, model, shape, noise, device, progress,
                                     clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                                     model_kwargs=model_kwargs, eta=eta)

    def _run_reverse(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Apply ``step`` from x_T down to t = 0, yielding each step's dict (computed without autograd)."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list like (N, C, H, W), got {type(shape).__name__}")
        if noise is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
        device = _sampling_device(model, noise, device)
        x = torch.randn(*shape, device=device) if noise is None else noise
        T = self.num_timesteps
        timesteps = torch.arange(T, device=device).unsqueeze(1).repeat(1, shape[0])   # (T, N): row i is all i
        order = range(T - 1, -1, -1)
        for i in _with_progress_bar(order) if progress else order:
            with torch.set_grad_enabled(False):    # also while the consumer holds the step
                step_out = step(model, x, timesteps[i], **step_kwargs)
                yield step_out
            x = step_out["sample"]
