"""Fast ODE solvers from diffusers (DPM-Solver++, UniPC, Euler, Heun) driving a DiT.

The schedulers are built from the model's own diffusion: its base (1000-step) betas go in as
``trained_betas``, so a model trained on any schedule is sampled on that schedule; the prediction
type follows the diffusion (epsilon, or sample for predict_xstart models). The learned-variance
channels are split off before the scheduler sees the output (the schedulers take eps).

The model call -- [x, x] -> forward_with_cfg (or forward) -> the cond half's first C channels --
is one function of device tensors with static shapes, compiled once when asked; the scheduler's
``scale_model_input`` / ``step`` run eagerly between calls, as in diffusers' own pipelines. The
scheduler only runs on the conditional half: forward_with_cfg reads x[:N] only, so the null half
that DiT's DDPM loop carries along never influences the samples.

Timesteps: diffusers' pipelines hand ``scheduler.timesteps`` to the model unchanged (DiTPipeline:
expanded to the batch). We use ``timestep_spacing="trailing"`` for every solver, whose timesteps
are integers ending at 999 (the noisiest training step: x_T is pure noise), so the model sees the
integer 0..999 timesteps it was trained on; they are cast to int64 once, exactly (checked).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from .base import Sampler, with_progress
from .guidance import Guidance

# name -> (diffusers scheduler class, its settings beyond the shared ones in scheduler_config)
SOLVERS = {
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


class MissingDiffusersError(ImportError):
    """A solver was asked for but diffusers (an optional dependency) is not installed."""


def import_diffusers_class(class_name: str, why: str):
    """``diffusers.<class_name>``, or MissingDiffusersError naming the package to install."""
    try:
        import diffusers
    except ImportError as e:
        raise MissingDiffusersError(f"{why} needs diffusers, which is not installed: pip install diffusers") from e
    return getattr(diffusers, class_name)


def num_inference_steps(diffusion) -> int:
    """Solver steps for a diffusion: its respaced step count (create_diffusion("25") -> 25)."""
    return diffusion.num_timesteps


def scheduler_config(name: str, diffusion) -> dict:
    """The diffusers config (kwargs) of solver ``name`` for ``diffusion``'s training schedule."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    predicts_xstart = diffusion.model_mean_type.name == "START_X"
    betas = diffusion.base_betas  # the trained process, whatever its schedule (kept by respacing)
    return dict(num_train_timesteps=len(betas), trained_betas=betas.tolist(),
                prediction_type="sample" if predicts_xstart else "epsilon",
                timestep_spacing="trailing", **SOLVERS[name][1])


def build_scheduler(name: str, diffusion, steps: Optional[int] = None):
    """A fresh diffusers scheduler for solver ``name`` with its timesteps set (on the CPU: its
    per-step scalars stay host-side, as diffusers keeps them) and its step index at 0."""
    config = scheduler_config(name, diffusion)  # ValueError for an unknown name
    scheduler = import_diffusers_class(SOLVERS[name][0], f"--sampler {name}")(**config)
    scheduler.set_timesteps(steps or num_inference_steps(diffusion))
    # With a begin index the scheduler never searches its timesteps for the current one.
    scheduler.set_begin_index(0)
    return scheduler


def scheduler_model_timesteps(scheduler) -> torch.Tensor:
    """(S,) int64 timesteps the model sees, one per model evaluation (Heun: 2 * steps - 1)."""
    ts = scheduler.timesteps.double()
    rounded = ts.round()
    if not torch.equal(ts, rounded):
        raise ValueError(f"fractional model timesteps {ts[ts != rounded][:4].tolist()}: DiT was "
                         "trained on integer timesteps (use timestep_spacing='trailing')")
    return rounded.long()


class SolverSampler(Sampler):
    """Samples with the diffusers solver ``method`` (a key of SOLVERS) on the diffusion's base
    schedule, ``diffusion.num_timesteps`` solver steps. The compiled function is the model call."""

    def __init__(self, guidance: Guidance, diffusion, *, method: str):
        self.name = method
        self.steps = num_inference_steps(diffusion)
        probe = build_scheduler(method, diffusion, self.steps)  # fails early: bad name, no diffusers
        self.model_timesteps = scheduler_model_timesteps(probe).to(guidance.device)  # once: no copies
        self._step_kwargs = "generator" in inspect.signature(probe.step).parameters
        self.chain_timesteps = self.model_timesteps.tolist()  # host copy: the interval's coordinate
        C = guidance.model.in_channels

        def make_eps(model_call):
            def eps(x, t, y):
                """The noise prediction (N, C, H, W) for the scheduler: x (N, ...) the scaled model
                input, t, y the model batch's; the learned-variance channels (C..2C) are dropped here."""
                return model_call(guidance.double(x), t, y)[: x.shape[0], :C]
            return eps

        super().__init__(guidance, diffusion, make_eps)

    @property
    def num_model_evaluations(self) -> int:
        """Forward passes per sample: steps, or 2 * steps - 1 for Heun."""
        return len(self.model_timesteps)

    def _warmup_args(self, z_shape) -> tuple:
        y = self.guidance.labels(torch.zeros(z_shape[0], dtype=torch.int64))
        return torch.zeros(z_shape, device=self.device), self.model_timesteps[0].expand(y.shape[0]), y

    def _run(self, z, y, generator, progress) -> torch.Tensor:
        """z is scaled by the scheduler's init_noise_sigma (Euler/Heun work in sigma space). Only
        Euler draws noise (unused at its default s_churn=0): from ``generator`` if given."""
        scheduler = build_scheduler(self.name, self.diffusion, self.steps)  # solvers keep state
        x = z * scheduler.init_noise_sigma
        kwargs = {"generator": generator} if self._step_kwargs else {}
        steps = with_progress(enumerate(scheduler.timesteps), progress, total=len(scheduler.timesteps))
        for k, t in steps:
            x_in = scheduler.scale_model_input(x, t)
            eps = self.step_at(self.chain_timesteps[k])(x_in, self.model_timesteps[k].expand(y.shape[0]), y)
            x = scheduler.step(eps, t, x, return_dict=False, **kwargs)[0]
        return x
