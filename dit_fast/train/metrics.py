"""What training reports: DiT's log line (rank 0, stdout and log.txt), loss statistics kept on the
device between log lines, metrics.jsonl / TensorBoard, and the engine's numbers they include."""
from __future__ import annotations

import importlib.util
import json
import logging
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..atomic import atomic_write_text


def make_logger(run_dir: Path, rank: int) -> logging.Logger:
    """Rank 0 logs to stdout and run_dir/log.txt (DiT's format); other ranks stay silent."""
    logger = logging.getLogger(f"dit_fast.train.{run_dir}")
    logger.propagate = False
    logger.handlers.clear()
    sinks = ([logging.StreamHandler(), logging.FileHandler(run_dir / "log.txt")] if rank == 0
             else [logging.NullHandler()])
    fmt = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", "%Y-%m-%d %H:%M:%S")
    for sink in sinks:
        sink.setFormatter(fmt)
        logger.addHandler(sink)
    logger.setLevel(logging.INFO)
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
        self.unsynced = False
        self.start = time.time()

    def add(self, loss_sum: torch.Tensor, micro: int, step: int, check: bool) -> None:
        self.loss_sum += loss_sum.double()
        self.count += 1
        self.micro += micro
        self.unsynced = True
        if check:  # remember the first step whose loss was not finite, without syncing
            newly_bad = (~torch.isfinite(loss_sum)) & (self.first_bad < 0)
            self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, step),
                                         self.first_bad)

    def all_reduce(self, rank: int, world: int) -> tuple[float, dict[int, int]]:
        """Collective: (loss sum over ranks, {rank: first non-finite step} of the bad ranks).

        One all-reduce of [loss_sum, first_bad + 1 of rank 0, ..., of rank W-1] (each rank fills
        its own slot), then the one host sync of the log/checkpoint point."""
        vec = torch.zeros(1 + world, dtype=torch.float64, device=self.device)
        vec[0] = self.loss_sum
        vec[1 + rank] = (self.first_bad + 1).double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec)
        host = vec.tolist()
        self.unsynced = False
        return host[0], {r: int(v) - 1 for r, v in enumerate(host[1:]) if v > 0}

    def take(self, total: float, world: int) -> tuple[float, int, float]:
        """(loss averaged over ranks and micro-steps, steps, seconds) since the last take; resets."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.time() - self.start
        avg, steps = total / (self.micro * world), self.count
        self._reset()
        return avg, steps, seconds


class MetricsWriter:
    """Rank 0: metrics.jsonl (full-precision losses) and TensorBoard scalars when installed."""

    def __init__(self, run_dir: Path, rank: int):
        self.path, self.run_dir = run_dir / "metrics.jsonl", run_dir
        self.file = open(self.path, "a") if rank == 0 else None
        self.tb = self._tensorboard(None) if rank == 0 else None

    def _tensorboard(self, purge_step: int | None):
        if importlib.util.find_spec("tensorboard") is None:  # torch's writer needs the package
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def truncate_after(self, step: int) -> None:
        """On resume from ``step``: drop the records of later steps (they are about to be logged
        again) and a half-written last line, so every step appears once."""
        if self.file is None:
            return
        self.file.close()
        keep = []
        for line in self.path.read_text().splitlines() if self.path.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # cut off by a kill mid-write
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line + "\n")
        atomic_write_text(self.path, "".join(keep))
        self.file = open(self.path, "a")
        if self.tb is not None:
            self.tb.close()
            self.tb = self._tensorboard(step + 1)

    def write(self, record: dict, group: str = "train") -> None:
        """One metrics.jsonl line; its scalars under ``group/`` in TensorBoard (train/, eval/)."""
        if self.file is None:
            return
        print(json.dumps(record), file=self.file, flush=True)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(f"{group}/{key}", value, record["step"])

    def flush(self) -> None:
        """TensorBoard's events on disk (its writer buffers up to 2 minutes): called with every
        checkpoint, so a kill loses no event of a step that resume keeps."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """Idempotent: the trainer closes on every way out, failures included."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def as_float(value) -> float | None:
    return None if value is None else float(value.item() if torch.is_tensor(value) else value)


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
