"""What --ckpt names: the weights to load and, for our own runs, the config they were trained with.

    source = resolve_ckpt("results/003-DiT-S-2")            # the run's newest complete checkpoint
    source = resolve_ckpt("results/003-DiT-S-2/checkpoints/step-0001000")
    source = resolve_ckpt(".../step-0001000/ema-0001000.pt")
    source.weights   # the file (or diffusers folder) to load
    source.config    # the saved, resolved training Config, or None (official names, plain files)

Shared by sample.py, sample_ddp.py and the export. Which file a name or a run stands for ("official
name or path?", "which checkpoint of a run?") is dit_fast.checkpoint's one answer, the same that
train.py --init-from gets; this module adds the training config saved beside those weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dit_fast.checkpoint.run_files import resolve_run_weights, saved_config
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


def resolve_ckpt(spec: str) -> CkptSource:
    """--ckpt -> the weights and, for a run dir / step dir / EMA file in a step dir, the saved config.

    Raises FileNotFoundError when nothing is there (naming what is accepted).
    """
    from dit_fast.checkpoint import OFFICIAL_CHECKPOINTS, is_official_name, resolve_official
    if is_official_name(spec):
        return CkptSource(spec, resolve_official(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {spec} (--ckpt); pass a run directory, a "
                                f"checkpoints/step-NNNNNNN directory, a checkpoint file or one of "
                                f"{', '.join(OFFICIAL_CHECKPOINTS)}")
    weights = resolve_run_weights(path)
    saved = saved_config(weights)
    if saved is not None:
        return CkptSource(spec, weights, config_from_dict(saved), str(weights.parent))
    return CkptSource(spec, weights)
