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

import contextlib
import inspect
import time
from typing import Optional

import numpy as np
import torch

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


def base_betas(diffusion) -> np.ndarray:
    """The float64 betas of the diffusion's base process (before respacing), shape (T,).

    A respaced diffusion keeps only the alphas_cumprod of its kept steps; the base schedule is the
    named schedule (linear or squaredcos_cap_v2) that reproduces them. ValueError if none does.
    """
    from dit_fast.diffusion import get_named_beta_schedule

    num_steps = int(getattr(diffusion, "original_num_steps", diffusion.num_timesteps))
    kept = list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))
    if len(kept) == num_steps:
        return np.asarray(diffusion.betas, dtype=np.float64)
    for name in ("linear", "squaredcos_cap_v2"):
        betas = get_named_beta_schedule(name, num_steps)
        # Respacing recomputes alphas_cumprod from its own betas: equal up to round-off (1e-9 relative
        # at the cosine schedule's tiny last values); linear and cosine differ by far more.
        if np.allclose(np.cumprod(1.0 - betas)[kept], diffusion.alphas_cumprod, rtol=1e-6, atol=0):
            return np.asarray(betas, dtype=np.float64)
    raise ValueError("cannot recover the base betas of this respaced diffusion (not a linear or "
                     "squaredcos_cap_v2 schedule); pass the unrespaced diffusion, create_diffusion('')")


def num_inference_steps(diffusion) -> int:
    """Solver steps for a diffusion: its respaced step count (create_diffusion("25") -> 25)."""
    return len(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))


def scheduler_config(name: str, diffusion) -> dict:
    """The diffusers config (kwargs) of solver ``name`` for ``diffusion``'s training schedule."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    predicts_xstart = diffusion.model_mean_type.name == "START_X"
    betas = base_betas(diffusion)
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


def model_timesteps(scheduler) -> torch.Tensor:
    """(S,) int64 timesteps the model sees, one per model evaluation (Heun: 2 * steps - 1)."""
    ts = scheduler.timesteps.double()
    rounded = ts.round()
    if not torch.equal(ts, rounded):
        raise ValueError(f"fractional model timesteps {ts[ts != rounded][:4].tolist()}: DiT was "
                         "trained on integer timesteps (use timestep_spacing='trailing')")
    return rounded.long()


def model_autocast(device_type: str, amp_dtype):
    """The context a sampler's model call runs in: autocast to ``amp_dtype``, or nothing for fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype)


def make_eps_fn(model, *, use_cfg: bool, cfg_scale: float, guide_all_channels: bool, amp_dtype):
    """eps(x, t, y) -> (N, C, H, W) fp32: the model's noise prediction for the scheduler.

    x (N, C, H, W) scaled model input; t, y (B,) with B = 2N under guidance ([cond, null]).
    The learned-variance channels (C..2C) are dropped here.
    """
    C = model.in_channels
    device_type = next(model.parameters()).device.type

    def eps(x, t, y):
        with model_autocast(device_type, amp_dtype):
            if use_cfg:
                out = model.forward_with_cfg(torch.cat([x, x], 0), t, y, cfg_scale,
                                             guide_all_channels=guide_all_channels)
            else:
                out = model.forward(x, t, y)
        return out[: x.shape[0], :C].float()

    return eps


class SolverSampler:
    """Samples with a diffusers solver; the interface of dit_fast.sampling.Sampler (which
    delegates here for ``sampler`` in SOLVERS): ``compile(z_shape, mode)``, ``sample(z, labels)``."""

    def __init__(self, model, diffusion, *, sampler: str, cfg_scale: float = 4.0,
                 num_classes: int = 1000, use_cfg: bool = True, amp_dtype=None,
                 guide_all_channels: bool = False):
        self.name = sampler
        self.diffusion = diffusion
        self.num_classes = num_classes
        self.use_cfg = use_cfg
        self.device = next(model.parameters()).device
        self.steps = num_inference_steps(diffusion)
        probe = build_scheduler(sampler, diffusion, self.steps)  # fails early: bad name, no diffusers
        self.t_model = model_timesteps(probe).to(self.device)    # (S,) once: no per-step copies
        self._step_kwargs = "generator" in inspect.signature(probe.step).parameters
        self._eager_eps = make_eps_fn(model, use_cfg=use_cfg, cfg_scale=cfg_scale,
                                      guide_all_channels=guide_all_channels, amp_dtype=amp_dtype)
        self.eps = self._eager_eps
        self._cudagraphs = False
        self.compile_seconds = 0.0

    @property
    def num_model_evaluations(self) -> int:
        """Forward passes per sample (one batched CFG forward each): steps, or 2 * steps - 1 for Heun."""
        return len(self.t_model)

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(device=self.device, dtype=torch.int64)
        if not self.use_cfg:
            return labels
        return torch.cat([labels, torch.full_like(labels, self.num_classes)], 0)

    def compile(self, z_shape, mode: str, fullgraph: bool = True) -> float:
        """Compile the model call for x_T of shape ``z_shape`` and warm it up; returns the seconds."""
        self._cudagraphs = self.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        self.eps = torch.compile(self._eager_eps, mode=mode, fullgraph=fullgraph, dynamic=False)
        x = torch.zeros(z_shape, device=self.device)
        y = self._labels(torch.zeros(z_shape[0], dtype=torch.int64, device=self.device))
        t = self.t_model[0].expand(y.shape[0])
        devices = [self.device] if self.device.type == "cuda" else []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for _ in range(2 if self._cudagraphs else 1):  # CUDA graph trees record on the 2nd call
                self._call_eps(x, t, y)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def _call_eps(self, x, t, y):
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self.eps(x, t, y).clone()  # a CUDA graph's output is overwritten by its next replay
        return self.eps(x, t, y)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
               progress: bool = False) -> torch.Tensor:
        """x_T = z (N, C, H, W) standard normal, labels (N,) -> x_0 (N, C, H, W).

        z is scaled by the scheduler's init_noise_sigma (Euler/Heun work in sigma space). Only
        Euler draws noise (unused at its default s_churn=0): from ``generator`` if given.
        """
        scheduler = build_scheduler(self.name, self.diffusion, self.steps)  # solvers keep state
        y = self._labels(labels)
        x = z.float() * scheduler.init_noise_sigma
        kwargs = {"generator": generator} if self._step_kwargs else {}
        steps = enumerate(scheduler.timesteps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, total=len(scheduler.timesteps))
        for k, t in steps:
            x_in = scheduler.scale_model_input(x, t)
            eps = self._call_eps(x_in, self.t_model[k].expand(y.shape[0]), y)
            x = scheduler.step(eps, t, x, return_dict=False, **kwargs)[0]
        return x
