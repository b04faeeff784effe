"""REPA's training objective (Yu et al., "Representation Alignment for Generation", arXiv 2410.06940):
the SiT velocity loss on REPA's interpolant plus the alignment of projected early-block tokens with a
frozen encoder's patch tokens.

Time runs the other way from DiT's diffusion: the data sits at t = 0 and pure noise at t = 1, and
x_t = alpha_t x + sigma_t eps with (alpha, sigma) = (1 - t, t) ("linear") or (cos, sin)(pi t / 2)
("cosine"). The model regresses the velocity d_alpha x + d_sigma eps. The random draws and their
order are REPA's (t from the CPU generator, then the noise like the input), so a seed reproduces
REPA's numbers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..diffusion.losses import mean_flat

PATH_TYPES = ("linear", "cosine")  # = config.REPA_PATH_TYPES (config imports this package: no import here)
WEIGHTINGS = ("uniform", "lognormal")  # = config.REPA_WEIGHTINGS


def alignment_loss(zs, zs_tilde) -> torch.Tensor:
    """REPA's projection loss: minus the cosine similarity of each projected token with the encoder's
    token at the same position, averaged over tokens, summed over the batch and the encoders, then
    divided by (number of encoders x batch size of the first encoder), as REPA reduces it.

    zs: encoder tokens, one (N, T, Dz) tensor per encoder; zs_tilde: the model's projections of the
    same shapes. Pairs are taken in order and stop at the shorter list (REPA zips them).
    Returns a 0-dim tensor.
    """
    total = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        cosine = (F.normalize(z, dim=-1) * F.normalize(z_tilde, dim=-1)).sum(dim=-1)   # (N, T)
        total = total + (-cosine).mean(dim=-1).sum()       # per sample: mean over tokens
    return total / (len(zs) * zs[0].shape[0])


class SILoss:
    """REPA's ``SILoss``: ``loss(model, images, model_kwargs, zs) -> (denoising_loss, proj_loss)``.

    ``model(x_t, t, **model_kwargs)`` must return ``(velocity, [projected tokens per encoder])``; t is
    (N,) in [0, 1], not DiT's 0..999. ``denoising_loss`` is (N,), the squared error averaged per sample;
    ``proj_loss`` is a 0-dim tensor (see ``alignment_loss``; zero when ``zs`` is empty or None).
    ``weighting="lognormal"`` draws a log-normal sigma, ln sigma ~ N(P_mean, P_std^2), and maps it to t
    (sigma / (1 + sigma) on the linear path, 2/pi atan(sigma) on the cosine one). The defaults (0, 1)
    are REPA's current code, exp of a standard normal; its first release named EDM's P_mean / P_std
    without setting them (pass -1.2, 1.2 for EDM's).
    ``encoders``, ``accelerator``, ``latents_scale`` and ``latents_bias`` are accepted for REPA's
    signature and, as in REPA, not used by the loss.
    """

    def __init__(self, prediction: str = "v", path_type: str = "linear", weighting: str = "uniform",
                 encoders=None, accelerator=None, latents_scale=None, latents_bias=None,
                 P_mean: float = 0.0, P_std: float = 1.0):
        if prediction != "v":
            raise ValueError(f"prediction must be 'v' (REPA trains velocity only), got {prediction!r}")
        if path_type not in PATH_TYPES:
            raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.prediction, self.path_type, self.weighting = prediction, path_type, weighting
        self.encoders, self.accelerator = encoders or [], accelerator
        self.latents_scale, self.latents_bias = latents_scale, latents_bias
        self.P_mean, self.P_std = P_mean, P_std

    def interpolant(self, t: torch.Tensor):
        """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) of the path at t."""
        if self.path_type == "linear":
            return 1 - t, t, -1, 1
        half_angle = t * math.pi / 2
        return (torch.cos(half_angle), torch.sin(half_angle),
                -math.pi / 2 * torch.sin(half_angle), math.pi / 2 * torch.cos(half_angle))

    def sample_time(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, ..., 1) times, drawn on the CPU in float32 (REPA's generator and dtype)."""
        shape = (images.shape[0],) + (1,) * (images.ndim - 1)
        if self.weighting == "uniform":
            t = torch.rand(shape)
        else:
            sigma = (torch.randn(shape) * self.P_std + self.P_mean).exp()
            t = sigma / (1 + sigma) if self.path_type == "linear" else 2 / math.pi * torch.atan(sigma)
        return t.to(device=images.device, dtype=images.dtype)

    def __call__(self, model, images: torch.Tensor, model_kwargs=None, zs=None):
        t = self.sample_time(images)                            # first draw: the times
        noise = torch.randn_like(images)                        # second: the noise
        alpha, sigma, d_alpha, d_sigma = self.interpolant(t)
        x_t = alpha * images + sigma * noise
        target = d_alpha * images + d_sigma * noise             # the velocity dx_t / dt
        output, zs_tilde = model(x_t, t.flatten(), **(model_kwargs or {}))
        denoising_loss = mean_flat((output - target) ** 2)     # (N,)
        if not zs:
            return denoising_loss, torch.zeros((), device=images.device)
        return denoising_loss, alignment_loss(zs, zs_tilde)
