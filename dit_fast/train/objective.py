"""What the network learns: the ONE place train.py's objective is chosen.

    objective = build_objective(resolved_cfg)      # "diffusion" (DiT's) or "flow" (SiT's)
    per_sample = objective.loss(model_fn, x, y)    # (N,); TrainStep takes .mean()

``model_fn(x, t, y)`` is the engine in its precision; it returns the network's raw output (2C
channels for a learned-sigma DiT). Each objective draws its own random numbers in its reference's
order (DiT: t = randint on the device, then the noise inside training_losses; SiT: the noise, then
t on the CPU), so a seeded run reproduces the reference's losses.

Extension point: a new objective (REPA's SILoss with its encoder, ...) is a class built from the
resolved config with ``loss(model_fn, x, y) -> (N,)``, one entry in OBJECTIVES and one value in
config.OBJECTIVES (its flags in a config section of their own); TrainStep is not edited.
``model_fn(x, t, y, **kwargs)`` passes kwargs to the model (``return_hidden_at=k`` returns the
tokens after block k too, all in fp32). Two things are not the objective's: trainable modules
(REPA's projector) must live in the model the DeepSpeed engine wraps (train/engine.py), so the
optimizer, ZeRO partitioning, EMA and checkpoints see them; and batch items beyond (x, y) (REPA's
images, extract_features.py --keep-images) come from the data loader (train/data.py).
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

    def loss(self, model_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return self.diffusion.training_losses(model_fn, x, t, dict(y=y))["loss"]


class FlowObjective:
    """SiT's loss: Transport.training_losses on the model's first C output channels (SiT's models are
    learned-sigma DiTs whose second half is discarded; drop_learned_sigma does that)."""

    def __init__(self, cfg):
        import dataclasses

        from ..transport import create_transport
        self.transport = create_transport(**dataclasses.asdict(cfg.transport))  # the field names are SiT's

    def loss(self, model_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from ..transport import drop_learned_sigma
        return self.transport.training_losses(drop_learned_sigma(model_fn), x, dict(y=y))["loss"]


OBJECTIVES = {"diffusion": DiffusionObjective, "flow": FlowObjective}


def build_objective(cfg):
    """The objective of a resolved Config (cfg.train.objective)."""
    name = cfg.train.objective
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](cfg)
