"""Weights I/O, one concern a module (imports flow downwards only; no cycle):

    safe_io.py    the leaf: weights_only loading with an allow-list, safetensors reading, atomic
                  saving, CheckpointError / UnsafeCheckpointError (imports only dit_fast.atomic)
    official.py   the official DiT weights: names, download cache, and is_official_name -- the one
                  place that decides "official name or path?"
    run_files.py  the names inside a training run's checkpoints/ and the EMA file a run or step
                  directory stands for
    diffusers.py  our DiT <-> diffusers' DiTTransformer2DModel layout (names, config, reading)
    loading.py    load_state_dict (every source above), normalize_keys, load_into_model (strict)
    init_from.py  train.py --init-from: fit a trained model's weights into a new model (other
                  classes, other image size), naming every tensor not carried over
    export.py     the diffusers DiTPipeline export (export_diffusers.py is its script)

Training run directories themselves (atomic step directories, resume) are dit_fast.train.run_dir.
"""
from .loading import load_into_model, load_state_dict, normalize_keys
from .official import (OFFICIAL_CHECKPOINTS, download_official, is_official_name, official_checkpoint_name,
                       resolve_official)
from .safe_io import SAFE_GLOBALS, CheckpointError, UnsafeCheckpointError, atomic_save, safe_torch_load

__all__ = [
    "OFFICIAL_CHECKPOINTS", "SAFE_GLOBALS", "CheckpointError", "UnsafeCheckpointError", "atomic_save",
    "download_official", "is_official_name", "load_into_model", "load_state_dict", "normalize_keys",
    "official_checkpoint_name", "resolve_official", "safe_torch_load"]
