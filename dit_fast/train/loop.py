"""DiT training under DeepSpeed: ``train(cfg)`` builds everything, then ``TrainLoop`` runs the steps.

No CLI parsing here (train.py does that): ``train(cfg)`` takes a resolved ``Config``.

    cfg = config_from_args(args)
    train(cfg)      # under `deepspeed train.py`, `torchrun train.py` or plain `python train.py`

Training semantics are DiT's: t ~ randint(0, T) per sample, loss = training_losses(...)["loss"]
.mean(), AdamW at a constant lr, EMA (0.9999) after every optimizer step, rank r seeded with
global_seed * world_size + r.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, config_to_dict, format_config, save_config
from ..distributed import deepspeed_uses_cuda, env_world, init_distributed
from .data import build_loader, open_training_data, set_data_epoch
from .engine import build_deepspeed_config, build_engine, engine_dtype, seed_everything, zero_stage
from .metrics import LogStats, MetricsWriter, as_float, loss_scale, make_logger, peak_mem_mb
from .run_dir import load_training_checkpoint, make_run_dir, resolve_resume, save_training_checkpoint


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the run stops without saving a checkpoint of the bad state."""


@dataclass
class Position:
    """Where training stands: optimizer steps done and the data position."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def prepare(cfg: Config):
    """All input checks that need no process group: DeepSpeed JSON vs flags, the data vs the model.

    Returns (ds_config, data_info). Raises before any step with a message naming the bad input.
    """
    _, world_size, _ = env_world()
    if cfg.train.precision == "fp16" and not deepspeed_uses_cuda():
        raise ValueError("--precision fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                         "use --precision bf16 or fp32 on CPU")
    ds_config = build_deepspeed_config(cfg, world_size)
    info = open_training_data(cfg)
    cfg.model.in_channels, cfg.model.input_size = info.in_channels, info.input_size
    return ds_config, info


def train(cfg: Config) -> Position:
    """Run (or resume) training as configured. Collective: every rank calls it."""
    ds_config, info = prepare(cfg)
    ctx = init_distributed(use_deepspeed=True)
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    resume_from = resolve_resume(cfg.train.resume, cfg.train.results_dir)
    run_dir = make_run_dir(cfg, rank, resume_from)
    logger = make_logger(run_dir, rank)
    if rank == 0:
        if cfg.train.resume == "auto" and resume_from is None:
            logger.info(f"--resume auto: no checkpoint under {cfg.train.results_dir}; starting fresh")
        save_config(cfg, run_dir / "config.json")
        logger.info(f"Experiment directory: {run_dir}  (world size {world})")
        logger.info("Config:\n" + format_config(cfg))
        logger.info("DeepSpeed config: " + json.dumps(ds_config, sort_keys=True))
    engine, ema = build_engine(cfg, ds_config, device, rank, world)
    if rank == 0:
        n_params = sum(p.numel() for p in ema.model.parameters())
        logger.info(f"DiT Parameters: {n_params:,}")
    loop = TrainLoop(cfg, engine, ema, info, device, run_dir, logger, ds_config)
    seed_everything(cfg.train.global_seed * world + rank)  # DiT's per-rank seed
    # A fresh EMA is already the fp32 copy of the initial weights (DiT's update_ema(decay=0));
    # copying back from the engine would round it to the engine's bf16.
    if resume_from is not None:
        loop.resume(resume_from)  # restores this rank's RNG states too
    return loop.run()


class TrainLoop:
    """The optimizer-step loop; holds the engine, EMA, data and logging state."""

    def __init__(self, cfg, engine, ema, info, device, run_dir, logger, ds_config):
        from ..diffusion import create_diffusion
        self.cfg, self.engine, self.ema, self.info = cfg, engine, ema, info
        self.device, self.run_dir, self.logger = device, run_dir, logger
        self.rank, self.world, _ = env_world()
        self.zero3 = zero_stage(ds_config) == 3
        self.dtype = engine_dtype(cfg.train.precision)
        self.diffusion = create_diffusion(timestep_respacing=cfg.diffusion.timestep_respacing,
                                          noise_schedule=cfg.diffusion.noise_schedule,
                                          learn_sigma=cfg.model.learn_sigma,
                                          diffusion_steps=cfg.diffusion.diffusion_steps)
        self.loader, self.sampler = build_loader(info, cfg, self.rank, self.world, device)
        self.steps_per_epoch = self.sampler.batches_per_epoch() // cfg.train.grad_accum
        self.vae = info.vae.to(device) if info.vae is not None else None
        self.pos = Position()
        self.resumed = False
        self.metrics = MetricsWriter(run_dir, self.rank)

    # ------------------------------------------------------------ resume / save
    def resume(self, ckpt: Path) -> None:
        state, ema_state = load_training_checkpoint(self.engine, ckpt, self.rank, self.world,
                                                    config_to_dict(self.cfg)["model"])
        if self.ema.model is not None:
            self.ema.load_state_dict(ema_state)
        self.pos = Position(state["step"], state["epoch"], state["step_in_epoch"])
        self.resumed = True
        if state["world_size"] != self.world:
            self.logger.warning(f"checkpoint was written by {state['world_size']} ranks, this run "
                                f"has {self.world}: training continues, but not bit-exactly")
        self.logger.info(f"Resumed from {ckpt} at step {self.pos.step} (epoch {self.pos.epoch}, "
                         f"step {self.pos.step_in_epoch} of it)")

    def save(self) -> Path:
        train_state = {"step": self.pos.step, "epoch": self.pos.epoch,
                       "step_in_epoch": self.pos.step_in_epoch, "world_size": self.world,
                       "skipped_steps": self.skipped_steps(), "config": config_to_dict(self.cfg)}
        ema_state = self.ema.state_dict() if self.ema.model is not None else None
        path = save_training_checkpoint(self.engine, ema_state, train_state, self.run_dir,
                                        self.pos.step, self.rank, self.cfg.train.keep_last)
        self.logger.info(f"Saved checkpoint to {path}")
        return path

    def skipped_steps(self) -> int:
        """fp16 overflow steps skipped so far (DeepSpeed restores the count on resume)."""
        return int(getattr(self.engine, "skipped_steps", 0))

    # ------------------------------------------------------------ the step
    def model_fn(self, x, t, y):
        """The engine in its precision; t stays an integer timestep (never rounded to bf16)."""
        return self.engine(x.to(self.dtype), t, y).float()

    def micro_step(self, x, y) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)  # (N, C, h, w)
        y = y.to(self.device, non_blocking=True)  # (N,)
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.encode(x)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=self.device)
        loss = self.diffusion.training_losses(self.model_fn, x, t, dict(y=y))["loss"].mean()
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def optimizer_step(self, batches) -> torch.Tensor:
        """grad_accum micro-steps = one optimizer step; returns the summed micro losses."""
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.train.grad_accum):
            x, y = next(batches)
            total += self.micro_step(x, y)
        self.ema.update(self.engine.module, self.zero3)
        return total

    def run(self) -> Position:
        """Train until --epochs or --max-steps; checkpoint every --ckpt-every and at the end."""
        t = self.cfg.train
        if self._normalize_position():
            self.logger.info("Nothing to do: the resumed run already reached its end")
            return self.pos
        self.logger.info(f"Training for {t.epochs} epochs / {t.max_steps or 'no'} max steps, "
                         f"{self.steps_per_epoch} steps per epoch")
        self.engine.train()
        stats = LogStats(self.device)
        last_saved = self.pos.step if self.resumed else -1
        while not self._done():
            set_data_epoch(self.info, self.sampler, self.pos.epoch,
                           self.pos.step_in_epoch * t.grad_accum)
            batches = iter(self.loader)
            while self.pos.step_in_epoch < self.steps_per_epoch and not self._done():
                loss_sum = self.optimizer_step(batches)
                self.pos.step += 1
                self.pos.step_in_epoch += 1
                stats.add(loss_sum, t.grad_accum, self.pos.step, check=t.precision != "fp16")
                if self.pos.step % t.log_every == 0:
                    self.log(stats)
                if self.pos.step % t.ckpt_every == 0:
                    self._check_finite(stats)
                    self.save()
                    last_saved = self.pos.step
            if self.pos.step_in_epoch >= self.steps_per_epoch:
                self.pos.epoch += 1
                self.pos.step_in_epoch = 0
        if stats.count:
            self.log(stats)
        if last_saved != self.pos.step:
            self._check_finite(stats)
            self.save()
        self.engine.eval()
        self.logger.info("Done!")
        self.metrics.close()
        return self.pos

    def _done(self) -> bool:
        t = self.cfg.train
        return self.pos.epoch >= t.epochs or (t.max_steps is not None and self.pos.step >= t.max_steps)

    def _normalize_position(self) -> bool:
        if self.pos.step_in_epoch >= self.steps_per_epoch:
            self.pos.epoch, self.pos.step_in_epoch = self.pos.epoch + 1, 0
        return self._done()

    # ------------------------------------------------------------ logging
    def _check_finite(self, stats: LogStats) -> None:
        bad = int(stats.first_bad.item())
        if bad >= 0:
            message = (f"non-finite loss (NaN/inf) at step {bad}: stopping without saving; the last "
                       f"good checkpoint under {self.run_dir / 'checkpoints'} is intact. Lower --lr, "
                       "or use --precision fp32/bf16 with --grad-clip")
            self.logger.error(message)
            raise NonFiniteLossError(message)

    def log(self, stats: LogStats) -> None:
        """DiT's line, then throughput, memory, grad norm, loss scale (and fp16 skips)."""
        t = self.cfg.train
        self._check_finite(stats)
        avg_loss, steps, seconds = stats.reduce(self.world)
        steps_per_sec = steps / max(seconds, 1e-9)
        grad_norm = as_float(self.engine.get_global_grad_norm())
        scale = loss_scale(self.engine, t.precision)
        line = (f"(step={self.pos.step:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: "
                f"{steps_per_sec:.2f}, Images/Sec: {steps_per_sec * t.global_batch_size:.1f}, "
                f"Peak Mem: {peak_mem_mb(self.device):.0f} MB, Grad Norm: "
                f"{'n/a' if grad_norm is None else f'{grad_norm:.4f}'}, Loss Scale: {scale:g}")
        if t.precision == "fp16":
            line += f", Skipped Steps: {self.skipped_steps()}"
        self.logger.info(line)
        self.metrics.write({"step": self.pos.step, "loss": avg_loss, "steps_per_sec": steps_per_sec,
                            "grad_norm": grad_norm, "loss_scale": scale,
                            "skipped_steps": self.skipped_steps()})
