"""DDPM (ancestral) and DDIM sampling steps and loops, mixed into GaussianDiffusion.

Random draws happen in the original's order (initial randn(*shape), then one randn_like(x) per
step after the model call, at t = 0 too), so a seeded run reproduces DiT's samples. The per-step
timestep tensors are rows of one (T, N) tensor built on the device before the loop: no host ->
device copy, no .item() and no sync inside the loop.
"""
import torch


def _nonzero_mask(t, x):
    # (N, 1, ..., 1): no noise is added at the last step (t == 0).
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


class SamplingMixin:
    """Sampling methods; needs p_mean_variance, condition_mean/score, _extract, num_timesteps."""

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 *, noise=None):
        """Sample x_{t-1} ~ p(x_{t-1} | x_t). Returns {'sample', 'pred_xstart'} of x's shape.

        noise (extension): a pre-drawn randn_like(x), e.g. for a compiled step whose own RNG would
        differ from eager; None draws it here, after the model call, as the original does.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if noise is None:
            noise = torch.randn_like(x)
        nonzero_mask = _nonzero_mask(t, x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0, *, noise=None):
        """Sample x_{t-1} with DDIM (Song et al., eq. 12); eta = 0 is deterministic.
        Returns {'sample', 'pred_xstart'}; noise as in p_sample."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 prediction, whatever the model predicts.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        if noise is None:
            noise = torch.randn_like(x)  # drawn even for eta = 0, as the original does
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                            model_kwargs=None, eta=0.0):
        """Deterministic DDIM step x_t -> x_{t+1} (the reverse ODE). Returns {'sample', 'pred_xstart'}."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is the deterministic ODE: eta must be 0.0, got {eta}")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # --------------------------------------------------------------------------------- loops
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Generate samples of `shape` (N, C, H, W) with ancestral (DDPM) sampling.

        noise: the starting x_T (default randn(*shape, device=device)); device defaults to the
        model's parameters' device; progress=True shows a tqdm bar. Returns the final sample.
        """
        final = None
        for sample in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            final = sample
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Like p_sample_loop, but yields p_sample's dict after every step (T-1 down to 0)."""
        img, t_rows, indices = self._loop_start(model, shape, noise, device, progress)
        for i in indices:
            with torch.no_grad():
                out = self.p_sample(
                    model, img, t_rows[i], clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                    cond_fn=cond_fn, model_kwargs=model_kwargs,
                )
                yield out
                img = out["sample"]

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        """Generate samples with DDIM; same arguments as p_sample_loop plus eta. Returns the sample."""
        final = None
        for sample in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                     progress=False, eta=0.0):
        """Like ddim_sample_loop, but yields ddim_sample's dict after every step."""
        img, t_rows, indices = self._loop_start(model, shape, noise, device, progress)
        for i in indices:
            with torch.no_grad():
                out = self.ddim_sample(
                    model, img, t_rows[i], clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                    cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta,
                )
                yield out
                img = out["sample"]

    def _loop_start(self, model, shape, noise, device, progress):
        """Initial x_T, the (T, N) timestep rows on the device, and the step indices T-1..0."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list like (N, C, H, W), got {type(shape).__name__}")
        if noise is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
        device = _resolve_device(model, noise, device)
        img = noise if noise is not None else torch.randn(*shape, device=device)
        T = self.num_timesteps
        t_rows = torch.arange(T, device=device).view(T, 1).expand(T, shape[0]).contiguous()  # (T, N)
        indices = list(range(T))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        return img, t_rows, indices


def _resolve_device(model, noise, device):
    if device is not None:
        return torch.device(device)
    # The original takes the model's parameter device; a plain function (e.g. a bound
    # forward_with_cfg) has none, so fall back to the noise's device.
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    if noise is not None:
        return noise.device
    raise ValueError(
        "cannot tell which device to sample on: pass device=... (the model has no parameters and "
        "no noise was given)"
    )
