"""What the network learns: the ONE place train.py's objective is chosen.

    objective = build_objective(resolved_cfg)      # "diffusion" (DiT's), "flow" (SiT's), "repa"
    per_sample = objective.loss(model_fn, x, y)    # (N,); TrainStep takes .mean()
    model = wrap_model(resolved_cfg, dit)          # build_engine: the module the engine trains

``model_fn(x, t, y)`` is the engine in its precision; it returns the network's raw output (2C
channels for a learned-sigma DiT). Each objective draws its own random numbers in its reference's
order (DiT: t = randint on the device, then the noise inside training_losses; SiT: the noise, then
t on the CPU), so a seeded run reproduces the reference's losses.

Extension point: a new objective is a class built from the resolved config with
``loss(model_fn, x, y, images=None) -> (N,)``, one entry in OBJECTIVES and one value in
config.OBJECTIVES (its flags in a config section of their own); TrainStep is not edited.
``model_fn(x, t, y, **kwargs)`` passes kwargs to the model and returns fp32. Optional hooks:
``check(cfg, data_info)`` (input checks before anything is created), ``wrap_model(cfg, dit)`` (its
trainable modules go INTO the model the engine wraps, so the optimizer, ZeRO, the EMA and the
checkpoint hold them: REPA's projector; engine.py calls it), ``needs_images`` (the loader adds each
item's uint8 image to the batch: train/data.py) and ``extra_metrics(world)`` (running means printed
after DiT's log line).
"""
from __future__ import annotations

from typing import Callable

import torch


class DiffusionObjective:
    """DiT's loss: t ~ randint(0, T) per sample, GaussianDiffusion.training_losses (bit-identical to
    the original train.py)."""

    def __init__(self, cfg):
        from ..diffusion import create_diffusion
        d = cfg.diffusion
        self.diffusion = create_diffusion(timestep_respacing=d.timestep_respacing, noise_schedule=d.noise_schedule,
                                          learn_sigma=cfg.model.learn_sigma, diffusion_steps=d.diffusion_steps)

    def loss(self, model_fn: Callable, x: torch.Tensor, y: torch.Tensor, images=None) -> torch.Tensor:
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return self.diffusion.training_losses(model_fn, x, t, dict(y=y))["loss"]


class FlowObjective:
    """SiT's loss: Transport.training_losses on the model's first C output channels (SiT's models are
    learned-sigma DiTs whose second half is discarded; drop_learned_sigma does that)."""

    def __init__(self, cfg):
        import dataclasses

        from ..transport import create_transport
        self.transport = create_transport(**dataclasses.asdict(cfg.transport))  # the field names are SiT's

    def loss(self, model_fn: Callable, x: torch.Tensor, y: torch.Tensor, images=None) -> torch.Tensor:
        from ..transport import drop_learned_sigma
        return self.transport.training_losses(drop_learned_sigma(model_fn), x, dict(y=y))["loss"]


def _repa():
    from ..repa.objective import RepaObjective  # imports transformers only when REPA is asked for
    return RepaObjective


OBJECTIVES = {"diffusion": lambda: DiffusionObjective, "flow": lambda: FlowObjective, "repa": _repa}


def objective_class(cfg):
    """The class of cfg.train.objective (its hooks are class-level: usable before it is built)."""
    name = cfg.train.objective
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


def build_objective(cfg):
    """The objective of a resolved Config (cfg.train.objective)."""
    return objective_class(cfg)(cfg)


def check_objective(cfg, info) -> None:
    """The objective's own input checks (before any process group or run dir exists)."""
    check = getattr(objective_class(cfg), "check", None)
    if check is not None:
        check(cfg, info)


def wrap_model(cfg, dit: torch.nn.Module) -> torch.nn.Module:
    """The module the engine trains: the DiT itself, or the DiT inside the objective's wrapper."""
    wrap = getattr(objective_class(cfg), "wrap_model", None)
    return dit if wrap is None else wrap(cfg, dit)


def needs_images(cfg) -> bool:
    """Whether the objective reads the batch's uint8 images (REPA's encoder)."""
    return bool(getattr(objective_class(cfg), "needs_images", False))
