"""State dicts from any supported source, wrapper-prefix removal, and strict fitting into a model.

Sources: official names (dit_fast.checkpoint.official), torch and safetensors files (plain state
dicts or training checkpoints with ``ema`` / ``model`` / ``state_dict`` / ``module``), training run
directories and their step directories (their EMA file), and diffusers DiT transformers
(dit_fast.checkpoint.diffusers).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from . import diffusers
from .official import OFFICIAL_CHECKPOINTS, resolve_official
from .run_files import resolve_run_weights
from .safe_io import CheckpointError, is_state_dict, read_safetensors, safe_torch_load

# Names that wrappers insert into parameter keys: DDP/DeepSpeed ("module." in front), torch.compile
# ("_orig_mod." in front or per compiled block) and torch's checkpoint_wrapper.
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module")
_STATE_DICT_KEYS = ("model", "state_dict", "module")


def load_state_dict(path_or_name, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from an official name, a checkpoint file or a run.

    Accepts the official names (``OFFICIAL_CHECKPOINTS``, downloaded once), a training run
    directory (its newest complete checkpoint's EMA) or a ``checkpoints/step-NNNNNNN`` directory
    (its EMA file), ``.safetensors`` and
    torch files (``.pt``/``.pth``/``.bin``) holding either a state dict or a training checkpoint
    with ``"ema"`` (used when ``prefer_ema``) / ``"model"`` / ``"state_dict"`` / ``"module"``.
    Wrapper prefixes (``module.``, ``_orig_mod.``) are removed. A diffusers DiT transformer
    (folder, pipeline folder or .safetensors in the hub layout) comes back converted to our names as
    a ``DiffusersStateDict``, which ``load_into_model`` checks against the model's config.
    """
    path = resolve_run_weights(resolve_official(path_or_name))
    if diffusers.is_diffusers_checkpoint(path):
        return diffusers.read_diffusers_weights(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Pass a .pt/.pth/.bin/.safetensors file, a training run or "
            f"step directory, a diffusers DiT transformer folder, or one of the official names: "
            f"{', '.join(OFFICIAL_CHECKPOINTS)}.")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        state = _pick_state_dict(safe_torch_load(path), prefer_ema, path)
    return normalize_keys(state, source=path)


def _pick_state_dict(obj, prefer_ema: bool, path: Path) -> Mapping:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    if is_state_dict(obj):
        return obj
    order = ("ema",) + _STATE_DICT_KEYS if prefer_ema else _STATE_DICT_KEYS + ("ema",)
    for key in order:
        if isinstance(obj.get(key), Mapping) and is_state_dict(obj[key]):
            return obj[key]
    raise CheckpointError(
        f"{path} is neither a state dict nor a training checkpoint with one of the entries "
        f"{', '.join(repr(k) for k in order)}; its top-level keys are: "
        f"{_truncate(sorted(map(str, obj)), 20)}.")


def normalize_keys(state: Mapping, source="state dict") -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes: leading ``module.``, and ``_orig_mod.`` / checkpoint-wrapper parts."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _normalize_key(key)
        if new in out:
            raise CheckpointError(f"{source}: keys collide after removing wrapper prefixes: {new}")
        out[new] = value
    return out


def _normalize_key(key: str) -> str:
    parts = key.split(".")
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_PARTS)


def _truncate(items: list, limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def load_into_model(model: torch.nn.Module, state_dict: Mapping, hint: str | None = None):
    """Load ``state_dict`` into ``model`` strictly; on any mismatch raise ONE clear error.

    Keys and shapes are compared before loading; the error lists missing, unexpected and
    wrong-shape keys (with both shapes). Wrapper prefixes are ignored on both sides, so a
    compiled or wrapped model loads a plain checkpoint. Returns ``model``.
    """
    if isinstance(state_dict, diffusers.DiffusersStateDict):  # its config must fit; it has no pos_embed
        state_dict = diffusers.fit_to_model(state_dict, model)
    own = model.state_dict()
    own_by_name = {_normalize_key(k): k for k in own}
    given = normalize_keys(state_dict)
    missing = sorted(k for k in own_by_name if k not in given)
    unexpected = sorted(k for k in given if k not in own_by_name)
    wrong = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(own[own_by_name[k]].shape)}"
        for k in given
        if k in own_by_name and given[k].shape != own[own_by_name[k]].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(_mismatch_message(model, missing, unexpected, wrong, hint))
    model.load_state_dict({own_by_name[k]: v for k, v in given.items()}, strict=True)
    return model


def _mismatch_message(model, missing, unexpected, wrong, hint) -> str:
    lines = [
        f"The checkpoint does not fit the {type(model).__name__} model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected and {len(wrong)} wrong-shape keys."]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            lines.append(f"  {title} ({len(items)}): {_truncate(items, 12)}")
    lines.append(hint or (
        "Hint: build the model the checkpoint was trained with (check --model, --image-size, "
        "--num-classes and learn-sigma), or pass the matching --ckpt."
    ))
    return "\n".join(lines)


