"""What training reports: DiT's log line (rank 0, stdout and log.txt), loss statistics kept on the
device between log lines, metrics.jsonl / TensorBoard, and the engine's numbers they include."""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist


def make_logger(run_dir: Path, rank: int) -> logging.Logger:
    """Rank 0 logs to stdout and run_dir/log.txt (DiT's format); other ranks stay silent."""
    logger = logging.getLogger(f"dit_fast.train.{run_dir}")
    logger.propagate = False
    logger.handlers.clear()
    if rank == 0:
        fmt = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", "%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(), logging.FileHandler(run_dir / "log.txt")):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


class LogStats:
    """Loss accumulated on the device between log lines (no per-step host sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count, self.micro = 0, 0
        self.start = time.time()

    def add(self, loss_sum: torch.Tensor, micro: int, step: int, check: bool) -> None:
        self.loss_sum += loss_sum.double()
        self.count += 1
        self.micro += micro
        if check:  # remember the first step whose loss was not finite, without syncing
            newly_bad = (~torch.isfinite(loss_sum)) & (self.first_bad < 0)
            self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, step),
                                         self.first_bad)

    def reduce(self, world: int) -> tuple[float, int, float]:
        """(loss averaged over ranks and micro-steps, steps, seconds) since the last call."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self.start
        total = self.loss_sum.clone()
        dist.all_reduce(total)
        avg, steps = total.item() / (self.micro * world), self.count
        self._reset()
        return avg, steps, seconds


class MetricsWriter:
    """Rank 0: metrics.jsonl (full-precision losses) and TensorBoard scalars when installed."""

    def __init__(self, run_dir: Path, rank: int):
        self.file = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
        self.tb = None
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def loss_scale(engine, precision: str) -> float:
    if precision != "fp16":
        return 1.0
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if value is not None:
            return float(value)
    return float("nan")


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MB
