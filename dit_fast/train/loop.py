"""DiT training under DeepSpeed: ``train(cfg)`` builds everything, then ``TrainLoop`` runs the steps.

No CLI parsing here (train.py does that): ``train(cfg)`` takes a resolved ``Config``.

    cfg = config_from_args(args)
    train(cfg)      # under `deepspeed train.py`, `torchrun train.py` or plain `python train.py`

Training semantics are DiT's: t ~ randint(0, T) per sample, loss = training_losses(...)["loss"]
.mean(), AdamW at a constant lr, EMA (0.9999) after every optimizer step, rank r seeded with
global_seed * world_size + r.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.run_files import step_dir_name
from ..config import Config, config_to_dict, format_config, save_config
from ..dispatch import check_backends
from ..distributed import (broadcast_from_rank0, deepspeed_uses_cuda, env_world, guarded_collective,
                           init_distributed)
from ..faults import maybe_fault, poison
from ..preempt import Preempted, PreemptionFlag
from .data import build_loader, close_workers, open_training_data, set_data_epoch
from .disk import check_disk_space
from .engine import build_deepspeed_config, build_engine, micro_batch_size, seed_everything, zero_stage
from .evaluate import TrainingEvaluator, check_evaluation
from .metrics import LogStats, MetricsWriter, as_float, loss_scale, make_logger, peak_mem_mb
from .objective import check_objective
from .reshard import engine_load_dir
from .resume import check_resume_latent_norm, check_resume_spec, resolve_resume
from .run_dir import load_training_checkpoint, make_run_dir, save_training_checkpoint
from .step import TrainStep


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the run stops without saving a checkpoint of the bad state."""


@dataclass
class Position:
    """Where training stands: optimizer steps done and the data position."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def prepare(cfg: Config):
    """All input checks that need no process group: DeepSpeed JSON vs flags, backends, the data vs
    the model, --resume and --results-dir. Nothing is created here (no group, no run dir).

    Returns (resolved, ds_config, data_info, init_plan): ``resolved`` is a copy of ``cfg`` with the
    derived values filled in once (model in_channels / input_size from the data, the micro batch); it
    is what the run uses, prints and saves. ``cfg`` itself is never written. ``init_plan`` is
    --init-from's weights, checked against the resolved model, or None. Raises before any step with a
    message naming the bad input.
    """
    _, world_size, _ = env_world()
    on_gpu = deepspeed_uses_cuda()
    if cfg.train.precision == "fp16" and not on_gpu:
        raise ValueError("--precision fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                         "use --precision bf16 or fp32 on CPU")
    check_backends(cfg.model.attn_backend, cfg.model.adaln_backend, "cuda" if on_gpu else "cpu")
    results = Path(cfg.train.results_dir)
    if results.exists() and not results.is_dir():
        raise NotADirectoryError(f"--results-dir {str(results)!r} is a file, not a directory")
    check_resume_spec(cfg.train.resume)
    ds_config = build_deepspeed_config(cfg, world_size)
    info = open_training_data(cfg)
    resolved = copy.deepcopy(cfg)
    resolved.model.in_channels, resolved.model.input_size = info.in_channels, info.input_size
    resolved.data.latent_norm = info.latent_norm.to_dict() if info.latent_norm is not None else None
    check_resume_latent_norm(cfg.train.resume, resolved.data.latent_norm)
    resolved.train.micro_batch_size = micro_batch_size(cfg, world_size)
    _check_data_fits(resolved, len(info.dataset), info.input_size, world_size)
    check_objective(resolved, info)  # REPA: images beside the data, the block, the encoder
    check_evaluation(resolved, world_size)
    room = check_disk_space(resolved, zero_stage(ds_config))  # ValueError when one checkpoint won't fit
    if room and env_world()[0] == 0:
        print(f"train.py: warning: {room}", file=sys.stderr)
    return resolved, ds_config, info, _plan_init_from(resolved)


def _plan_init_from(cfg: Config):
    """--init-from: read the source and check every tensor against this run's resolved model (built
    on the meta device: shapes only) before the process group or the run directory exist."""
    if cfg.train.keep_labels and not cfg.train.init_from:
        raise ValueError("--keep-labels needs --init-from (it says which label rows of that checkpoint to keep)")
    if not cfg.train.init_from:
        return None
    from ..checkpoint.init_from import plan_init_from
    from ..models import build_model
    with torch.device("meta"):
        shapes = build_model(cfg.model)
    return plan_init_from(cfg.train.init_from, shapes, cfg.model.num_classes, cfg.train.keep_labels)


def _check_data_fits(cfg: Config, items: int, input_size: int, world_size: int) -> None:
    """The model's patches tile the input, and every rank gets at least one optimizer step."""
    if input_size % cfg.model.patch_size:
        raise ValueError(f"the model input is {input_size}x{input_size}, not divisible by "
                         f"{cfg.model.model}'s patch size {cfg.model.patch_size}; pick another "
                         "--model patch size or --image-size")
    per_rank = -(-items // world_size)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    if per_rank < per_step:
        raise ValueError(f"{items} items give each of the {world_size} rank(s) {per_rank}, fewer "
                         f"than one optimizer step ({per_step}: micro batch x --grad-accum); lower "
                         "--global-batch-size or use more data")


def train(cfg: Config) -> Position:
    """Run (or resume) training as configured. Collective: every rank calls it."""
    cfg, ds_config, info, init_plan = prepare(cfg)  # from here on the resolved config
    ctx = init_distributed(use_deepspeed=True, timeout_s=cfg.train.collective_timeout)
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    # Rank 0 alone looks (and repairs an interrupted publish); its choice, or its error, reaches all.
    choice = broadcast_from_rank0(lambda: resolve_resume(cfg.train.resume, cfg.train.results_dir,
                                                         config_to_dict(cfg)), rank)
    run_dir = make_run_dir(cfg, rank, choice.path)
    logger = make_logger(run_dir, rank)
    if rank == 0:
        for note in choice.notes:
            (logger.warning if note.startswith("WARNING") else logger.info)(note)
        save_config(cfg, run_dir / "config.json")
        logger.info(f"Experiment directory: {run_dir}  (world size {world})")
        logger.info("Config:\n" + format_config(cfg))
        logger.info("DeepSpeed config: " + json.dumps(ds_config, sort_keys=True))
    if choice.path is not None:  # a resumed run continues its own weights, not --init-from's
        init_plan = None
    if rank == 0 and init_plan is not None:
        logger.info(f"--init-from {init_plan.source}: {len(init_plan.full)} tensors loaded; a new run "
                    "(step 0, fresh optimizer, EMA = the loaded weights)")
        for note in init_plan.notes:
            logger.info(f"--init-from: {note}")
    load_dir = None if choice.path is None else \
        engine_load_dir(choice.path, world, rank, ds_config, logger.info)  # another world: universal
    engine, ema = build_engine(cfg, ds_config, device, rank, world, init_plan=init_plan)
    if rank == 0:
        dit = getattr(ema.model, "dit", ema.model)  # REPA trains the DiT inside a wrapper
        logger.info(f"DiT Parameters: {sum(p.numel() for p in dit.parameters()):,}")
        if dit is not ema.model:
            extra = sum(p.numel() for p in ema.model.parameters()) - sum(p.numel() for p in dit.parameters())
            logger.info(f"Projector Parameters: {extra:,}")
    loop = TrainLoop(cfg, engine, ema, info, device, run_dir, logger, ds_config)
    seed_everything(cfg.train.global_seed * world + rank)  # DiT's per-rank seed
    # A fresh EMA is already the fp32 copy of the initial weights (DiT's update_ema(decay=0));
    # copying back from the engine would round it to the engine's bf16.
    if choice.path is not None:
        loop.resume(choice.path, load_dir)  # restores this rank's RNG states too
    return loop.run()


class TrainLoop:
    """The optimizer-step loop; holds the engine, EMA, data and logging state."""

    def __init__(self, cfg, engine, ema, info, device, run_dir, logger, ds_config):
        self.cfg, self.engine, self.ema, self.info = cfg, engine, ema, info
        self.device, self.run_dir, self.logger = device, run_dir, logger
        self.rank, self.world, _ = env_world()
        self.loader, self.order = build_loader(info, cfg, self.rank, self.world, device)
        self.steps_per_epoch = self.order.batches_per_epoch() // cfg.train.grad_accum
        self.vae = info.vae.to(device) if info.vae is not None else None
        self.train_step = TrainStep.from_config(cfg, engine, ema, device, self.vae)
        self.pos = Position()
        self.resumed = self.resharded = False
        self.metrics = MetricsWriter(run_dir, self.rank)
        self.evaluator = TrainingEvaluator.maybe(cfg, device, self.rank, self.world, logger, self.metrics,
                                                 self.vae)
        self.preempt = PreemptionFlag().install()  # SIGTERM/SIGUSR1/SIGINT: save, then stop
        self.preempt.join_group(self.world)

    # ------------------------------------------------------------ resume / save
    def resume(self, ckpt: Path, load_dir: Path | None = None) -> None:
        state, ema_state = load_training_checkpoint(self.engine, ckpt, self.rank, self.world,
                                                    config_to_dict(self.cfg)["model"], load_dir)
        if self.ema.model is not None:
            self.ema.load_state_dict(ema_state)
        self.pos = Position(state["step"], state["epoch"], state["step_in_epoch"])
        self.resumed = True
        self.resharded = load_dir is not None and Path(load_dir) != Path(ckpt)
        self.metrics.truncate_after(self.pos.step)  # the steps after it are about to run again
        if state["world_size"] != self.world:
            self.logger.warning(f"checkpoint was written by {state['world_size']} ranks, this run "
                                f"has {self.world}: training continues, but not bit-exactly")
        self.logger.info(f"Resumed from {ckpt} at step {self.pos.step} (epoch {self.pos.epoch}, "
                         f"step {self.pos.step_in_epoch} of it)")

    def save(self, stats: LogStats | None = None) -> Path:
        """Every rank agrees the loss is finite (stats given), then all write the checkpoint."""
        if stats is not None and stats.unsynced:
            self.sync(stats, "the pre-checkpoint finite check")
        train_state = {"step": self.pos.step, "epoch": self.pos.epoch,
                       "step_in_epoch": self.pos.step_in_epoch, "world_size": self.world,
                       "zero_stage": int(self.engine.zero_optimization_stage()),
                       "skipped_steps": self.skipped_steps(), "config": config_to_dict(self.cfg)}
        ema_state = self.ema.state_dict() if self.ema.model is not None else None
        self.metrics.flush()  # the TensorBoard events up to this step, before the step is published
        path = save_training_checkpoint(self.engine, ema_state, train_state, self.run_dir,
                                        self.pos.step, self.rank, self.cfg.train.keep_last)
        self.logger.info(f"Saved checkpoint to {path}")
        return path

    def skipped_steps(self) -> int:
        """fp16 overflow steps skipped so far (DeepSpeed restores the count on resume)."""
        return int(getattr(self.engine, "skipped_steps", 0))

    # ------------------------------------------------------------ the step
    def optimizer_step(self, batches) -> torch.Tensor:
        """One optimizer step through the trainer's one step (step.py; the table times the same)."""
        return self.train_step.optimizer_step(batches)

    def run(self) -> Position:
        """Train until --epochs or --max-steps; checkpoint every --ckpt-every and at the end; on a
        preemption signal, checkpoint the step every rank agreed on and raise Preempted."""
        try:
            return self._run()
        finally:
            self.preempt.uninstall()
            close_workers(self.loader)
            self.metrics.close()  # a failed run's last TensorBoard events too

    def _run(self) -> Position:
        t = self.cfg.train
        if self.resharded:  # loaded the universal form: rewrite this step in
            self.save()  # this world's own layout, so the next resume loads it directly
        if self._normalize_position():
            self.logger.info("Nothing to do: the resumed run already reached its end")
            return self.pos
        self.logger.info(f"Training for {t.epochs} epochs / {t.max_steps or 'no'} max steps, "
                         f"{self.steps_per_epoch} steps per epoch")
        self.engine.train()
        stats = LogStats(self.device)
        last_saved = self.pos.step if self.resumed else -1
        while not self._done():
            set_data_epoch(self.info, self.order, self.pos.epoch,
                           self.pos.step_in_epoch * t.grad_accum)
            batches = iter(self.loader)
            while self.pos.step_in_epoch < self.steps_per_epoch and not self._done():
                loss_sum = poison("loss", self.pos.step + 1, self.optimizer_step(batches))
                maybe_fault("step.mid", self.pos.step + 1)
                self.pos.step += 1
                self.pos.step_in_epoch += 1
                stats.add(loss_sum, t.grad_accum, self.pos.step, check=t.precision != "fp16")
                if self.pos.step % t.log_every == 0:
                    self.log(stats)
                if self.evaluator is not None and self.evaluator.due(self.pos.step):
                    stats.start += self.evaluator.run(self.pos.step, self.ema)  # not part of steps/sec
                if self.pos.step % t.ckpt_every == 0:  # after the evaluation: a kill in it redoes it
                    self.save(stats)
                    last_saved = self.pos.step
                if self.preempt.agreed(self.world):  # one tiny all-reduce per step
                    self._stop_preempted(stats, last_saved)
            if self.pos.step_in_epoch >= self.steps_per_epoch:
                self.pos.epoch += 1
                self.pos.step_in_epoch = 0
                maybe_fault("epoch.boundary", self.pos.step)
        if stats.count:
            self.log(stats)
        if last_saved != self.pos.step:
            self.save(stats)
        self.engine.eval()
        self.logger.info("Done!")
        return self.pos

    def _stop_preempted(self, stats: LogStats, last_saved: int) -> None:
        got = self.preempt.signal_name
        self.logger.info(f"Preemption signal ({got or 'on another rank'}): saving step "
                         f"{self.pos.step}, then stopping")
        path = self.save(stats) if last_saved != self.pos.step else \
            self.run_dir / "checkpoints" / step_dir_name(self.pos.step)
        raise Preempted(f"stopped by a signal after step {self.pos.step}; checkpoint {path} is "
                        "complete: rerun with --resume auto to continue")

    def _done(self) -> bool:
        t = self.cfg.train
        return self.pos.epoch >= t.epochs or (t.max_steps is not None and self.pos.step >= t.max_steps)

    def _normalize_position(self) -> bool:
        if self.pos.step_in_epoch >= self.steps_per_epoch:
            self.pos.epoch, self.pos.step_in_epoch = self.pos.epoch + 1, 0
        return self._done()

    # ------------------------------------------------------------ logging
    def sync(self, stats: LogStats, what: str) -> float:
        """The all-ranks sync point (log lines, checkpoints): one all-reduce of the loss sum and of
        every rank's first non-finite step, so a NaN on any rank stops every rank here, at the same
        step; a peer that never arrives becomes CollectiveTimeout naming it. Returns the loss sum."""
        step = self.pos.step
        maybe_fault("sync", step)
        total, bad = guarded_collective(lambda: stats.all_reduce(self.rank, self.world), what,
                                        step, self.cfg.train.collective_timeout)
        if bad:
            first = min(bad.values())
            ranks = sorted(r for r, s in bad.items() if s == first)
            message = (f"non-finite loss (NaN/inf) at step {first} on rank {', '.join(map(str, ranks))}"
                       f" (every rank stops at step {step}): stopping without saving; the last good "
                       f"checkpoint under {self.run_dir / 'checkpoints'} is intact. Lower --lr, or use "
                       "--precision fp32/bf16 with --grad-clip")
            self.logger.error(message)
            raise NonFiniteLossError(message)
        return total

    def log(self, stats: LogStats) -> None:
        """DiT's line, then throughput, memory, grad norm, loss scale (and fp16 skips)."""
        t = self.cfg.train
        total = self.sync(stats, "the loss all-reduce")
        avg_loss, steps, seconds = stats.take(total, self.world)
        steps_per_sec = steps / max(seconds, 1e-9)
        grad_norm = as_float(self.engine.get_global_grad_norm())
        scale = loss_scale(self.engine, t.precision)
        line = (f"(step={self.pos.step:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: "
                f"{steps_per_sec:.2f}, Images/Sec: {steps_per_sec * t.global_batch_size:.1f}, "
                f"Peak Mem: {peak_mem_mb(self.device):.0f} MB, Grad Norm: "
                f"{'n/a' if grad_norm is None else f'{grad_norm:.4f}'}, Loss Scale: {scale:g}")
        if t.precision == "fp16":
            line += f", Skipped Steps: {self.skipped_steps()}"
        extra = self.objective_metrics()
        line += "".join(f", {name.replace('_', ' ').title()}: {value:.4f}" for name, value in extra.items())
        self.logger.info(line)
        self.metrics.write({"step": self.pos.step, "loss": avg_loss, "steps_per_sec": steps_per_sec,
                            "grad_norm": grad_norm, "loss_scale": scale,
                            "skipped_steps": self.skipped_steps(), **extra})

    def objective_metrics(self) -> dict:
        """The objective's own running means (REPA: proj_loss); collective, like the loss sync."""
        extra = getattr(self.train_step.objective, "extra_metrics", None)
        return extra(self.world) if extra is not None else {}
