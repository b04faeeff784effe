"""Where a training run keeps its weights: the names inside ``results/NNN-<model>/checkpoints/`` and
the EMA file that a run directory or a ``step-NNNNNNN`` directory stands for.

The layout is written by dit_fast.train.run_dir (which imports these names); it lives here so that
loading weights from a run needs nothing of the training package.
"""
from __future__ import annotations

import re
from pathlib import Path

from .safe_io import safe_torch_load

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAIN_STATE = "train_state.pt"
CHECKPOINTS = "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def ema_file_name(step: int) -> str:
    return f"ema-{step:07d}.pt"


def is_complete(ckpt: Path) -> bool:
    """A finished checkpoint dir: renamed from .tmp and holding the rank-0 state."""
    return ckpt.is_dir() and STEP_DIR.match(ckpt.name) is not None and (ckpt / TRAIN_STATE).is_file()


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under one run's checkpoints/ dir, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(STEP_DIR.match(p.name).group(1)), p) for p in ckpt_root.iterdir()
             if STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found)


def resolve_run_weights(path) -> Path:
    """The EMA file ``path`` stands for: a run directory -> its newest complete checkpoint's EMA, a
    ``step-NNNNNNN`` directory -> its EMA; any other path comes back unchanged.

    A run directory without a complete checkpoint, or a step directory without its EMA file, is a
    FileNotFoundError naming what is missing.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    match = STEP_DIR.match(path.name)
    if match:
        ema = path / ema_file_name(int(match.group(1)))
        if not ema.is_file():
            raise FileNotFoundError(f"{path} is a checkpoint directory without its EMA weights "
                                    f"({ema.name}): an unfinished save?")
        return ema
    if (path / CHECKPOINTS).is_dir():
        found = list_checkpoints(path / CHECKPOINTS)
        if not found:
            raise FileNotFoundError(f"the run directory {path} has no complete checkpoint under "
                                    f"{CHECKPOINTS}/ yet")
        return resolve_run_weights(found[-1][1])
    return path


def saved_config(weights) -> dict | None:
    """The resolved training config (a plain dict) rank 0 saved in train_state.pt beside ``weights``
    when it is the EMA file of a complete checkpoint; None for any other file."""
    weights = Path(weights)
    if weights.is_file() and is_complete(weights.parent):
        return safe_torch_load(weights.parent / TRAIN_STATE)["config"]
    return None
