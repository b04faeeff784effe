"""The one construction point of a sampler: ``build_sampler(model, diffusion, method=...)``.

METHODS maps a ``--sampler`` name to a factory ``(guidance, diffusion, **options) -> Sampler``; a
new method is one more entry, no edit of the others. "ode" / "sde" are SiT's flow samplers: their
``diffusion`` is a dit_fast.transport Transport and their options SiT's flags (flow.FlowSampler).
"""
from __future__ import annotations

from .ancestral import AncestralSampler
from .base import Sampler
from .flow import FlowSampler
from .guidance import Guidance
from .solvers import SOLVERS, SolverSampler

ANCESTRAL = ("ddpm", "ddim")  # ours, bit-identical to the original; SOLVERS come from diffusers


def _ancestral(name: str):
    def factory(guidance, diffusion, *, clip_denoised=False, eta=0.0):
        return AncestralSampler(guidance, diffusion, method=name, clip_denoised=clip_denoised, eta=eta)
    return factory


def _solver(name: str):
    def factory(guidance, diffusion, *, clip_denoised=False, eta=0.0):
        if eta or clip_denoised:
            raise ValueError(f"eta and clip_denoised are options of ddpm/ddim, not of {name}")
        return SolverSampler(guidance, diffusion, method=name)
    return factory


def _flow(mode: str):
    def factory(guidance, transport, *, clip_denoised=False, eta=0.0, **options):
        if eta or clip_denoised:
            raise ValueError("eta and clip_denoised are options of ddpm/ddim, not of a flow sampler")
        return FlowSampler(guidance, transport, mode=mode, **options)
    return factory


FLOW_METHODS = ("ode", "sde")
METHODS = {
    **{name: _ancestral(name) for name in ANCESTRAL},
    **{name: _solver(name) for name in SOLVERS},
    **{name: _flow(name.upper()) for name in FLOW_METHODS},
}
SAMPLERS = tuple(m for m in METHODS if m not in FLOW_METHODS)  # --sampler's choices (diffusion)


def build_sampler(model, diffusion, *, method: str = "ddpm", cfg_scale: float = 4.0,
                  num_classes: int = 1000, use_cfg: bool = True, precision: str = "fp32",
                  clip_denoised: bool = False, eta: float = 0.0,
                  guide_all_channels: bool = False, cfg_interval=None, **flow_options) -> Sampler:
    """A sampler drawing class-conditional samples of ``model`` under ``diffusion``.

    ``method``: one of SAMPLERS ("ddpm", the original's; "ddim"; diffusers' solvers dpm-solver++,
    unipc, euler, heun, which run diffusion.num_timesteps solver steps on the base schedule).
    use_cfg=True runs model.forward_with_cfg on [z, z] with labels [y, num_classes] (what the
    original sample.py always does); use_cfg=False runs model.forward on z alone. ``precision``:
    autocast of the model call only (the diffusion math stays fp32). ``cfg_interval=(low, high)``:
    guide only at model times in it (diffusion: the 1000-step chain's timestep; flow: SiT's t),
    one unguided forward of batch N elsewhere.

    Flow models (SiT): ``method`` "ode" or "sde", ``diffusion`` a dit_fast.transport Transport and
    ``flow_options`` SiT's sampler flags (sampling_method, num_steps, atol, rtol, reverse,
    diffusion_form, diffusion_norm, last_step, last_step_size; flow.FlowSampler).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(METHODS)}")
    if flow_options and method not in FLOW_METHODS:
        raise ValueError(f"{', '.join(sorted(flow_options))}: options of the flow samplers (ode, sde), "
                         f"not of {method}")
    guidance = Guidance(model, num_classes, cfg_scale=cfg_scale, use_cfg=use_cfg,
                        guide_all_channels=guide_all_channels, precision=precision,
                        cfg_interval=cfg_interval)
    return METHODS[method](guidance, diffusion, clip_denoised=clip_denoised, eta=eta, **flow_options)


def decode(samples, vae):
    """Latents -> images in [-1, 1] through the VAE (dit_fast.vae: decode undoes its latent
    normalisation, SD's: / 0.18215);
    pixel-space samples (vae None) are returned unchanged."""
    return samples if vae is None else vae.decode(samples)
