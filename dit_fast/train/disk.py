"""Before the first step: will one checkpoint fit on the results filesystem?

A run whose disk cannot hold a single checkpoint used to find out at its first --ckpt-every, hours
in. The size is estimated from the model (built on the meta device: no memory, no time) and the
optimizer, summed over every rank's files (they share the results directory):

    module (DeepSpeed's mp_rank_00 file)   params x bytes of --precision (2 for bf16/fp16, 4 fp32)
    fp32 master weights                    params x 4, unless fp32 ZeRO-0 (the module is the master)
    AdamW exp_avg + exp_avg_sq             params x 8, partitioned by ZeRO but summed here
    EMA (rank 0)                           params x 4

DiT-XL/2 (675 M params, bf16, ZeRO-2): 675e6 x 18 = 12.2 GB. The run stops with one line (exit 2)
when the free space is below one checkpoint, and warns below ``keep_last + 1`` (the new one is
written before the oldest is pruned); ``--ignore-disk-check`` proceeds anyway.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..config import Config


def estimate_checkpoint_bytes(cfg: Config, zero_stage: int) -> int:
    """Bytes of one training checkpoint of ``cfg``'s model (see the module docstring)."""
    from ..models import build_model
    with torch.device("meta"):
        model = build_model(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    working = 4 if cfg.train.precision == "fp32" else 2
    master = 0 if (cfg.train.precision == "fp32" and zero_stage == 0) else 4
    return total * working + trainable * (master + 8) + total * 4


def free_bytes(directory: str) -> tuple[Path, int]:
    """(the nearest existing ancestor of ``directory``, its filesystem's free bytes)."""
    path = Path(directory).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path, shutil.disk_usage(path).free


def check_disk_space(cfg: Config, zero_stage: int) -> str | None:
    """Raise ValueError when one checkpoint cannot fit; return a warning line when keep_last + 1
    cannot; None when there is room (or --ignore-disk-check)."""
    t = cfg.train
    if t.ignore_disk_check:
        return None
    need = estimate_checkpoint_bytes(cfg, zero_stage)
    where, free = free_bytes(t.results_dir)
    if free < need:
        raise ValueError(f"--results-dir {t.results_dir!r}: {_gb(free)} free on {where}'s filesystem, "
                         f"one checkpoint needs about {_gb(need)}; free space, pick another "
                         "--results-dir, or pass --ignore-disk-check to start anyway")
    keep = t.keep_last + 1 if t.keep_last else 2
    if free < keep * need:
        return (f"--results-dir {t.results_dir!r}: {_gb(free)} free holds fewer than the {keep} "
                f"checkpoints of about {_gb(need)} that --keep-last {t.keep_last} needs while saving")
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
