"""Classifier-free-guidance sampler for DiT with an optionally compiled per-step function.

The original samples with ``diffusion.p_sample_loop(model.forward_with_cfg, ...)``, which rebuilds
timestep and coefficient tensors from numpy on every step (host->device copies). Here the whole
per-step update -- the CFG forward plus the DDPM / DDIM update -- is one function of device tensors:
the per-step coefficients are precomputed once as float32 tables (the original looks them up in
float64 and rounds to float32: the same values), so the Python loop only indexes views, draws the
step's noise and calls the step. That function can be compiled once with static shapes
(``fullgraph=True``; CUDA graphs on GPU). The flags and checks of sample.py / sample_ddp.py are
dit_fast.sample_cli.

Eager fp32 sampling performs the original's operations in the original's order and draws random
numbers in the original's order (x_T, then one ``randn`` of the full 2N batch per step, the last step
included), so it gives bit-identical samples to ``p_sample_loop`` for the same seed.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from dit_fast.config import PRECISION_DTYPES, PRECISIONS
from dit_fast.solvers import SOLVERS, SolverSampler, model_autocast

TABLE_SAMPLERS = ("ddpm", "ddim")  # ours, bit-identical to the original; SOLVERS come from diffusers
SAMPLERS = TABLE_SAMPLERS + tuple(SOLVERS)

# Column order of the per-step coefficient table (all float32).
_SQRT_RECIP_AC, _SQRT_RECIPM1_AC, _COEF1, _COEF2, _MIN_LOG, _MAX_LOG, _FIXED_LOGVAR, \
    _ALPHA_BAR, _ALPHA_BAR_PREV, _NONZERO = range(10)


@dataclass
class StepTables:
    """Per-step inputs on the device, row k for the k-th step (k = 0 is the noisiest)."""

    t_model: torch.Tensor  # (S, B) int64: original timesteps the model sees (timestep_map applied)
    coefs: torch.Tensor    # (S, 10) float32: the diffusion coefficients of that step

    @property
    def num_steps(self) -> int:
        return self.t_model.shape[0]


def build_step_tables(diffusion, batch: int, device) -> StepTables:
    """Precompute the per-step model timesteps and float32 coefficients of a (spaced) diffusion."""
    S = diffusion.num_timesteps
    betas = np.asarray(diffusion.betas, dtype=np.float64)
    post_var = np.asarray(diffusion.posterior_variance, dtype=np.float64)
    var_name = diffusion.model_var_type.name
    if var_name == "FIXED_LARGE":
        fixed_logvar = np.log(np.append(post_var[1], betas[1:]) if S > 1 else betas)
    else:  # FIXED_SMALL (LEARNED* ignore this column)
        fixed_logvar = np.asarray(diffusion.posterior_log_variance_clipped, dtype=np.float64)
    columns = [
        diffusion.sqrt_recip_alphas_cumprod, diffusion.sqrt_recipm1_alphas_cumprod,
        diffusion.posterior_mean_coef1, diffusion.posterior_mean_coef2,
        diffusion.posterior_log_variance_clipped, np.log(betas), fixed_logvar,
        diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev,
        (np.arange(S) != 0).astype(np.float64),
    ]
    # float64 -> float32 once: the same rounding as the original's per-step `arr[t].float()`.
    table = torch.from_numpy(np.stack([np.asarray(c, dtype=np.float64) for c in columns], 1)).float()
    timestep_map = getattr(diffusion, "timestep_map", list(range(S)))
    t_model = torch.tensor(timestep_map, dtype=torch.int64)
    order = torch.arange(S - 1, -1, -1)  # the loop runs t = S-1 ... 0
    return StepTables(
        t_model=t_model[order].view(S, 1).expand(S, batch).contiguous().to(device),
        coefs=table[order].contiguous().to(device),
    )


def make_denoise_step(model, diffusion, *, sampler: str = "ddpm", cfg_scale: float = 4.0,
                      use_cfg: bool = True, precision: str = "fp32", clip_denoised: bool = False,
                      eta: float = 0.0, guide_all_channels: bool = False) -> Callable:
    """Return step(x, t, y, c, noise) -> x_prev, one reverse-diffusion step.

    x (B, C, H, W) fp32 current sample (B = 2N with CFG: [cond half, null half]); t (B,) int64 model
    timesteps; y (B,) labels; c (10,) float32 coefficient row of build_step_tables; noise like x.
    The model runs under autocast for bf16/fp16; the diffusion math stays fp32.
    """
    if sampler not in TABLE_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)} (the "
                         f"solvers {', '.join(SOLVERS)} run through Sampler, not a per-step table)")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    amp_dtype = _amp_dtype(precision)
    learned = diffusion.model_var_type.name in ("LEARNED", "LEARNED_RANGE")
    predicts_xstart = diffusion.model_mean_type.name == "START_X"
    if use_cfg:
        forward = functools.partial(model.forward_with_cfg, guide_all_channels=guide_all_channels)
    else:
        forward = model.forward
    device_type = next(model.parameters()).device.type

    def model_call(x, t, y):
        with model_autocast(device_type, amp_dtype):
            out = forward(x, t, y, cfg_scale) if use_cfg else forward(x, t, y)
        return out.float()

    def mean_and_logvar(x, t, y, c):
        # p_mean_variance of the original, term for term.
        out = model_call(x, t, y)
        C = x.shape[1]
        if learned:
            out, var_values = torch.split(out, C, dim=1)
            frac = (var_values + 1) / 2
            log_var = frac * c[_MAX_LOG] + (1 - frac) * c[_MIN_LOG]
        else:
            log_var = c[_FIXED_LOGVAR].expand_as(x)
        if predicts_xstart:
            pred_xstart = out
        else:
            pred_xstart = c[_SQRT_RECIP_AC] * x - c[_SQRT_RECIPM1_AC] * out
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = c[_COEF1] * pred_xstart + c[_COEF2] * x
        return mean, log_var, pred_xstart

    def ddpm_step(x, t, y, c, noise):
        mean, log_var, _ = mean_and_logvar(x, t, y, c)
        return mean + c[_NONZERO] * torch.exp(0.5 * log_var) * noise

    def ddim_step(x, t, y, c, noise):
        _, _, pred_xstart = mean_and_logvar(x, t, y, c)
        eps = (c[_SQRT_RECIP_AC] * x - pred_xstart) / c[_SQRT_RECIPM1_AC]
        alpha_bar, alpha_bar_prev = c[_ALPHA_BAR], c[_ALPHA_BAR_PREV]
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        return mean_pred + c[_NONZERO] * sigma * noise

    return ddpm_step if sampler == "ddpm" else ddim_step


def _amp_dtype(precision: str):
    return None if precision == "fp32" else PRECISION_DTYPES[precision]  # fp32: no autocast


def default_compile_mode(device: torch.device) -> str:
    """CUDA graphs on GPU (the step is launch-bound at small batch); inductor's default on CPU."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


class Sampler:
    """Draws class-conditional samples with classifier-free guidance, eager or compiled.

        sampler = Sampler(model, create_diffusion("250"), cfg_scale=4.0, num_classes=1000)
        sampler.compile(batch=8)                 # optional; returns compile seconds
        latents = sampler.sample(z, labels)      # z (N, C, H, W) x_T, labels (N,) -> (N, C, H, W)

    use_cfg=True runs model.forward_with_cfg on [z, z] with labels [y, num_classes] (what the
    original sample.py always does); use_cfg=False runs model.forward on z alone (sample_ddp.py
    with cfg_scale == 1). ``sampler`` is "ddpm" (default), "ddim" or one of diffusers' solvers
    (dit_fast.solvers.SOLVERS: dpm-solver++, unipc, euler, heun), which run diffusion.num_timesteps
    solver steps on the diffusion's base schedule.
    """

    def __init__(self, model, diffusion, *, cfg_scale: float = 4.0, num_classes: int = 1000,
                 use_cfg: bool = True, sampler: str = "ddpm", precision: str = "fp32",
                 clip_denoised: bool = False, eta: float = 0.0, guide_all_channels: bool = False):
        check_null_label(model, num_classes, use_cfg)  # before any step, for every caller
        self.model = model
        self.diffusion = diffusion
        self.num_classes = num_classes
        self.use_cfg = use_cfg
        self.device = next(model.parameters()).device
        self.compile_seconds = 0.0
        self._solver = None
        if sampler in SOLVERS:
            if precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
            if eta or clip_denoised:
                raise ValueError(f"eta and clip_denoised are options of ddpm/ddim, not of {sampler}")
            self._solver = SolverSampler(model, diffusion, sampler=sampler, cfg_scale=cfg_scale,
                                         num_classes=num_classes, use_cfg=use_cfg,
                                         amp_dtype=_amp_dtype(precision),
                                         guide_all_channels=guide_all_channels)
            return
        self.step = make_denoise_step(model, diffusion, sampler=sampler, cfg_scale=cfg_scale,
                                      use_cfg=use_cfg, precision=precision,
                                      clip_denoised=clip_denoised, eta=eta,
                                      guide_all_channels=guide_all_channels)
        self._eager_step = self.step
        self._tables: dict[int, StepTables] = {}
        self._cudagraphs = False

    @property
    def num_model_evaluations(self) -> int:
        """Model forward passes per sample (one batched CFG forward each)."""
        return self._solver.num_model_evaluations if self._solver else self.diffusion.num_timesteps

    def tables(self, batch: int) -> StepTables:
        if batch not in self._tables:
            self._tables[batch] = build_step_tables(self.diffusion, batch, self.device)
        return self._tables[batch]

    def _model_batch(self, z: torch.Tensor, labels: torch.Tensor):
        """[z, z] and [labels, null] for CFG (the original's order), else z and labels."""
        if not self.use_cfg:
            return z, labels
        y_null = torch.full_like(labels, self.num_classes)
        return torch.cat([z, z], 0), torch.cat([labels, y_null], 0)

    def compile(self, z_shape, mode: Optional[str] = None, fullgraph: bool = True) -> float:
        """Compile the per-step function for x_T of shape `z_shape` (N, C, H, W) and warm it up.

        Returns the seconds spent (compilation plus warm-up runs), which sampling time excludes.
        The global RNG state is restored afterwards, so compiling never changes the samples.
        """
        mode = mode or default_compile_mode(self.device)
        if self._solver:
            self.compile_seconds = self._solver.compile(z_shape, mode, fullgraph)
            return self.compile_seconds
        self._cudagraphs = self.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        self.step = torch.compile(self._eager_step, mode=mode, fullgraph=fullgraph, dynamic=False)
        z = torch.zeros(z_shape, device=self.device)
        labels = torch.zeros(z_shape[0], dtype=torch.int64, device=self.device)
        x, y = self._model_batch(z, labels)
        tab = self.tables(x.shape[0])
        devices = [self.device] if self.device.type == "cuda" else []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            # CUDA graph trees run once to warm up and record on the second call.
            for _ in range(2 if self._cudagraphs else 1):
                self._call_step(x, tab.t_model[0], y, tab.coefs[0], torch.zeros_like(x))
            _synchronize(self.device)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def _call_step(self, x, t, y, c, noise):
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            # Outputs of a CUDA graph are overwritten by its next replay: own a copy.
            return self.step(x, t, y, c, noise).clone()
        return self.step(x, t, y, c, noise)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
               progress: bool = False) -> torch.Tensor:
        """Run the reverse process from x_T = z (N, C, H, W) for `labels` (N,); returns x_0 (N, C, H, W).

        Noise comes from `generator` if given, else from the global RNG (as the original). The loop
        does no host synchronisation: everything it indexes is already on the device.
        """
        if labels.shape != (z.shape[0],):
            raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(labels.shape)}")
        if self._solver:
            return self._solver.sample(z, labels, generator=generator, progress=progress)
        x, y = self._model_batch(z.float(), labels.to(device=z.device, dtype=torch.int64))
        tab = self.tables(x.shape[0])
        steps = range(tab.num_steps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps)
        for k in steps:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self._call_step(x, tab.t_model[k], y, tab.coefs[k], noise)
        if self.use_cfg:
            x, _ = x.chunk(2, dim=0)  # drop the null-class half
        return x


def decode(samples: torch.Tensor, vae) -> torch.Tensor:
    """Latents -> images in [-1, 1] through the VAE (dit_fast.vae: decode divides by 0.18215);
    pixel-space samples (vae None) are returned unchanged."""
    return samples if vae is None else vae.decode(samples)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device) -> tuple:
    """Run fn() and return (result, seconds), synchronising the device around it."""
    device = torch.device(device)
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return result, time.perf_counter() - start


def check_null_label(model, num_classes: int, use_cfg: bool) -> None:
    """Guidance needs the null label (row num_classes of the label table): a model trained with
    class_dropout_prob=0 has none, and its CFG forward would fail with an IndexError deep inside."""
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    if use_cfg and table is not None and table.num_embeddings == num_classes:
        raise ValueError(f"this model has no null label ({num_classes} label rows for {num_classes} "
                         "classes: trained with class_dropout_prob=0), so classifier-free "
                         "guidance is impossible; sample without guidance (sample_ddp.py --cfg-scale 1)")
