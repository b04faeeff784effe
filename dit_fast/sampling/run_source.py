"""What --ckpt names: the weights to load and, for our own runs, the config they were trained with.

    source = resolve_ckpt("results/003-DiT-S-2")            # the run's newest complete checkpoint
    source = resolve_ckpt("results/003-DiT-S-2/checkpoints/step-0001000")
    source = resolve_ckpt(".../step-0001000/ema-0001000.pt")
    source.weights   # the file (or diffusers folder) to load
    source.config    # the saved, resolved training Config, or None (official names, plain files)

Shared by sample.py, sample_ddp.py and the export: one answer to "official name or path?".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dit_fast.config import Config, config_from_dict


@dataclass
class CkptSource:
    """A resolved --ckpt."""

    spec: str
    """What the user passed."""
    weights: Path
    """The weights file or diffusers folder to load (an official name resolves to its cache)."""
    config: Optional[Config] = None
    """The training config saved with these weights (None: flags say what the model is)."""
    where: str = ""
    """Where the config was read, for messages."""


def _official(spec: str) -> Optional[Path]:
    from dit_fast.checkpoint import OFFICIAL_CHECKPOINTS, download_official
    if spec in OFFICIAL_CHECKPOINTS and not Path(spec).expanduser().exists():
        return download_official(spec)
    return None


def _saved_config_of_step(step_dir: Path) -> Config:
    """The resolved config rank 0 saved in the checkpoint's train_state.pt."""
    from dit_fast.checkpoint import safe_torch_load
    from dit_fast.train.run_dir import TRAIN_STATE
    state = safe_torch_load(step_dir / TRAIN_STATE)
    return config_from_dict(state["config"])


def _ema_file(step_dir: Path) -> Path:
    from dit_fast.train.run_dir import STEP_DIR, ema_file_name
    step = int(STEP_DIR.match(step_dir.name).group(1))
    path = step_dir / ema_file_name(step)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {step_dir} has no EMA weights ({path.name})")
    return path


def _newest_step(run_dir: Path) -> Path:
    from dit_fast.train.run_dir import list_checkpoints
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"--ckpt {str(run_dir)!r} is a run directory without a complete "
                                "checkpoint (checkpoints/step-NNNNNNN with train_state.pt)")
    return found[-1][1]


def is_step_dir(path: Path) -> bool:
    from dit_fast.train.run_dir import is_complete
    return is_complete(path)


def resolve_ckpt(spec: str) -> CkptSource:
    """--ckpt -> the weights and, for a run dir / step dir / EMA file in a step dir, the saved config.

    Raises FileNotFoundError when nothing is there (naming what is accepted).
    """
    official = _official(spec)
    if official is not None:
        return CkptSource(spec, official)
    path = Path(spec).expanduser()
    if not path.exists():
        from dit_fast.checkpoint import OFFICIAL_CHECKPOINTS
        raise FileNotFoundError(f"No checkpoint at {spec} (--ckpt); pass a run directory, a "
                                f"checkpoints/step-NNNNNNN directory, a checkpoint file or one of "
                                f"{', '.join(OFFICIAL_CHECKPOINTS)}")
    if path.is_dir() and (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        step = _newest_step(path)
        return CkptSource(spec, _ema_file(step), _saved_config_of_step(step), str(step))
    if path.is_dir() and is_step_dir(path):
        return CkptSource(spec, _ema_file(path), _saved_config_of_step(path), str(path))
    if path.is_file() and is_step_dir(path.parent):
        return CkptSource(spec, path, _saved_config_of_step(path.parent), str(path.parent))
    return CkptSource(spec, path)
