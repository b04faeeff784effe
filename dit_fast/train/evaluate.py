"""Evaluation during training (--eval-every, off by default): ADM's FID (and sFID, Inception Score,
precision, recall) of samples drawn from the EMA weights, logged beside the loss.

    check_evaluation(resolved_cfg, world_size)          # loop.prepare: bad flags fail before anything
    evaluator = TrainingEvaluator.maybe(cfg, ...)        # None when --eval-every is 0
    if evaluator and evaluator.due(step): seconds = evaluator.run(step, ema)

Every rank samples its share of --eval-samples from the fp32 EMA (rank 0 holds it; the others get it
by broadcast into a model of the same build), turns its samples into Inception features
(dit_fast.evaluation: the code evaluate.py and sample_ddp.py --evaluate run) and only the features
travel (gather_features); rank 0 computes the metrics against --eval-ref and logs them to log.txt,
metrics.jsonl and TensorBoard (eval/*), with the wall-clock cost and its share of the run so far.

Training is not disturbed: noise and labels come from dedicated generators seeded from
(global_seed, step, rank, batch), and the global torch CPU / CUDA, numpy and random states are saved
and restored around each evaluation, so a run with evaluation trains bit-identically to one without.
The loop evaluates a step before it checkpoints it: a kill during an evaluation resumes from an
earlier checkpoint and the evaluation is simply done again (fault point ``eval.mid``, dit_fast.faults,
between the sampling and the logging, is how the tests kill it there).
"""
from __future__ import annotations

import contextlib
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config
from ..sampling.config import SampleConfig
from ..faults import maybe_fault
from ..vae import is_pixel_space

DEFAULT_SAMPLERS = {"diffusion": "dpm-solver++", "flow": "heun", "repa": "heun"}
FLOW_EVAL_SAMPLERS = ("euler", "heun", "midpoint", "sde")  # fixed-step ODE methods, or SiT's SDE (Euler)
REPA_EVAL_SAMPLERS = ("euler", "heun", "sde")  # REPA's ODE (Euler / Heun) or its Euler-Maruyama SDE


def is_flow(cfg: Config) -> bool:
    return cfg.train.objective == "flow"


def eval_sampler_name(cfg: Config) -> str:
    """--eval-sampler, or the fast default of the objective (dpm-solver++ / the Heun ODE)."""
    objective = cfg.train.objective if cfg.train.objective in DEFAULT_SAMPLERS else "diffusion"
    return cfg.evaluation.eval_sampler or DEFAULT_SAMPLERS[objective]


def _flag_checks(cfg: Config, world_size: int) -> list:
    e, m = cfg.evaluation, cfg.model
    from ..evaluation.suite import minimum_images
    need = max(minimum_images(3), world_size)
    return [
        (e.eval_ref, "--eval-every needs --eval-ref REF_BATCH.npz (a reference batch)"),
        (e.eval_samples >= need, f"--eval-samples must be >= {need} (precision and recall with k=3, and one "
                                 f"sample per rank), got {e.eval_samples}"),
        (e.eval_steps > 0, f"--eval-steps must be positive, got {e.eval_steps}"),
        (e.eval_batch_size > 0, f"--eval-batch-size must be positive, got {e.eval_batch_size}"),
        (e.eval_cfg_scale >= 1.0, f"--eval-cfg-scale must be >= 1.0 (1.0: unguided), got {e.eval_cfg_scale}"),
        (e.eval_cfg_scale == 1.0 or m.class_dropout_prob > 0,
         "--eval-cfg-scale > 1 needs a null label, but this model trains without label dropout"),
        (not is_pixel_space(cfg.data.vae) or m.in_channels in (1, 3),
         f"evaluation needs RGB or grey images; pixel-space data has {m.in_channels} channels"),
    ]


def _check_sampler(cfg: Config) -> None:
    name = eval_sampler_name(cfg)
    if cfg.train.objective == "repa":
        if name not in REPA_EVAL_SAMPLERS:
            raise ValueError(f"--eval-sampler {name!r}: a REPA model is evaluated with one of "
                             f"{', '.join(REPA_EVAL_SAMPLERS)} (REPA's ODE, or its SDE)")
        return
    if is_flow(cfg):
        if name not in FLOW_EVAL_SAMPLERS:
            raise ValueError(f"--eval-sampler {name!r}: a flow model is evaluated with one of "
                             f"{', '.join(FLOW_EVAL_SAMPLERS)} (fixed-step ODE methods, or the SDE)")
        return
    from ..sampling import SAMPLERS, SOLVERS
    if name not in SAMPLERS:
        raise ValueError(f"--eval-sampler {name!r}: a diffusion model is evaluated with one of {', '.join(SAMPLERS)}")
    if name in SOLVERS:
        from ..sampling.solvers import import_diffusers_class
        try:
            import_diffusers_class("DPMSolverMultistepScheduler", f"--eval-sampler {name}")
        except ImportError as err:  # an optional dependency: a bad-input line, not a traceback
            raise ValueError(f"{err} (or pick --eval-sampler ddim)") from err


def check_evaluation(cfg: Config, world_size: int) -> None:
    """Every --eval-* flag, the reference batch's headers and the Inception weights file, before any
    group, directory or step exists (ValueError / FileNotFoundError naming the flag)."""
    e = cfg.evaluation
    if e.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0 (0: no evaluation), got {e.eval_every}")
    if not e.eval_every:
        given = [flag for flag, value in (("--eval-ref", e.eval_ref), ("--inception-weights", e.inception_weights),
                                          ("--eval-sampler", e.eval_sampler)) if value]
        if given:
            raise ValueError(f"{', '.join(given)}: options of --eval-every STEPS (evaluation is off)")
        return
    for ok, message in _flag_checks(cfg, world_size):
        if not ok:
            raise ValueError(message)
    _check_sampler(cfg)
    from ..evaluation.suite import check_reference
    check_reference(e.eval_ref, e.inception_weights, "--eval-ref")


def sample_config(cfg: Config) -> SampleConfig:
    """The sampling settings of an evaluation, in the one SampleConfig the sampling scripts use."""
    e, name = cfg.evaluation, eval_sampler_name(cfg)
    values = dict(model=cfg.model, diffusion=cfg.diffusion, vae=cfg.data.vae, latent_norm=cfg.data.latent_norm,
                  cfg_scale=e.eval_cfg_scale,
                  num_sampling_steps=e.eval_steps, objective=cfg.train.objective, transport=cfg.transport,
                  precision="fp32")
    if cfg.train.objective == "repa":  # REPA's time and samplers; its velocity is guided on every channel
        values.update(mode="SDE" if name == "sde" else "ODE", heun=name == "heun", guide_all_channels=True,
                      repa_path_type=cfg.repa.repa_path_type)
    elif is_flow(cfg):
        values.update(mode="SDE" if name == "sde" else "ODE", sampling_method=None if name == "sde" else name)
    else:
        values["sampler"] = name
    return SampleConfig(**values)


def eval_seed(global_seed: int, step: int, rank: int, batch: int) -> int:
    """A 64-bit seed per (run seed, step, rank, batch): no draw from any generator training uses."""
    return int(np.random.SeedSequence([global_seed, step, rank, batch]).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Restore the global torch CPU (and this CUDA device's), numpy and random states on exit."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


class TrainingEvaluator:
    """Samples, features and metrics of one evaluation; rank 0 keeps the reference's features."""

    def __init__(self, cfg: Config, device: torch.device, rank: int, world: int, logger, metrics, vae=None):
        from ..evaluation import FeatureExtractor
        self.cfg, self.e, self.device, self.rank, self.world = cfg, cfg.evaluation, device, rank, world
        self.logger, self.metrics = logger, metrics
        self.sample_cfg = sample_config(cfg)
        if vae is None and not is_pixel_space(cfg.data.vae):  # latents from --features-path: decode them
            from ..sampling.flags import load_sampling_vae  # undoing the run's latent normalisation
            vae = load_sampling_vae(self.sample_cfg, device)
        self.vae = vae
        self.extractor = FeatureExtractor(self.e.inception_weights, device=device)
        self.reference = None  # (features or None, file statistics or None): rank 0, at the first evaluation
        self.started, self.spent = time.perf_counter(), 0.0

    @classmethod
    def maybe(cls, cfg: Config, *args, **kwargs):
        """The evaluator, or None when --eval-every is 0."""
        return cls(cfg, *args, **kwargs) if cfg.evaluation.eval_every else None

    def due(self, step: int) -> bool:
        return step % self.e.eval_every == 0

    def run(self, step: int, ema) -> float:
        """Collective: evaluate the EMA at ``step``; returns the seconds it took (every rank)."""
        started = time.perf_counter()
        with preserved_rng(self.device), torch.no_grad():
            model = self._ema_on_every_rank(ema)
            local = self._features_of_samples(model, step)
            maybe_fault("eval.mid", step)  # the kill test: sampled, nothing logged yet
            del model
            from ..evaluation import gather_features
            features = gather_features(local)
            metrics = self._metrics(features) if self.rank == 0 else None
        seconds = time.perf_counter() - started
        self.spent += seconds
        if metrics is not None:
            self._report(step, metrics, seconds)
        return seconds

    def _ema_on_every_rank(self, ema) -> torch.nn.Module:
        """Rank 0's fp32 EMA; the other ranks receive it into a model of the same build."""
        own = getattr(ema.model, "dit", ema.model) if ema.model is not None else None  # REPA: not the projector
        if self.world == 1 or not (dist.is_available() and dist.is_initialized()):
            return own
        if self.rank == 0:
            model = own
        else:
            from ..models import build_model
            with torch.device(self.device):  # the values are overwritten: build where they will live
                model = build_model(self.cfg.model).float().eval().requires_grad_(False)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        return model

    def _features_of_samples(self, model, step: int):
        """This rank's share (samples rank, rank + W, ...) as Inception features, batch by batch."""
        from ..evaluation import Features
        from ..sampling import decode
        from ..sampling.flags import sampler_of
        from ..sampling.images import to_uint8_hwc
        sampler = sampler_of(self.sample_cfg, model, use_cfg=self.e.eval_cfg_scale > 1.0)
        m, mine = self.cfg.model, len(range(self.rank, self.e.eval_samples, self.world))
        parts = []
        for batch, start in enumerate(range(0, mine, self.e.eval_batch_size)):
            n = min(self.e.eval_batch_size, mine - start)
            g = torch.Generator(self.device).manual_seed(eval_seed(self.cfg.train.global_seed, step, self.rank, batch))
            z = torch.randn((n, m.in_channels, m.input_size, m.input_size), generator=g, device=self.device)
            y = torch.randint(0, m.num_classes, (n,), generator=g, device=self.device)
            images = to_uint8_hwc(decode(sampler.sample(z, y, generator=g), self.vae))
            if images.shape[-1] == 1:  # grey pixel-space data: the Inception sees it as RGB
                images = np.repeat(images, 3, axis=-1)
            parts.append(self.extractor(images))
        return Features.concat(parts)

    def _metrics(self, features) -> dict:
        from ..evaluation import evaluate_features
        if self.reference is None:
            self.reference = self._reference()
        ref_features, ref_stats = self.reference
        return evaluate_features(features, ref_features, ref_stats, device=self.device)

    def _reference(self):
        """(features of --eval-ref's images, cached beside it by content; or None) and its own statistics."""
        from ..evaluation.batches import cached_features, open_batch
        ref = open_batch(self.e.eval_ref, need_images=False)
        if ref.shape is None:
            return None, ref.stats
        features, _ = cached_features(ref, self.extractor, batch_size=self.e.eval_batch_size, log=self.logger.info)
        return features, ref.stats

    def _report(self, step: int, metrics: dict, seconds: float) -> None:
        from ..evaluation import format_metrics
        share = self.spent / max(time.perf_counter() - self.started, 1e-9)
        e = self.e
        self.logger.info(f"(step={step:07d}) Eval of the EMA on {e.eval_samples} samples ({eval_sampler_name(self.cfg)}, "
                         f"{e.eval_steps} steps, cfg {e.eval_cfg_scale:g}): {format_metrics(metrics)}; "
                         f"{seconds:.1f} s ({share:.1%} of the run so far)")
        self.metrics.write({"step": step, **metrics, "eval_seconds": seconds, "eval_share": share,
                            "eval_samples": e.eval_samples}, group="eval")
