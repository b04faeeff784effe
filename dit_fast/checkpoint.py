"""Checkpoints: official DiT weights (downloaded once), safe loading, strict fitting, atomic saving.

Loading never unpickles arbitrary Python objects: ``.pt`` files go through
``torch.load(weights_only=True)`` with a short, explicit allow-list (``SAFE_GLOBALS``), and
``.safetensors`` files hold tensors only. Saving goes through dit_fast.atomic (temp file,
fsync, rename, fsync of the directory), so a crash mid-write never destroys the previous checkpoint.
Training run directories (their step-NNNNNNN checkpoints, resume) are dit_fast.train.run_dir.
"""
from __future__ import annotations

import argparse
import http.client
import os
import pickle
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import atomic_write

# Official DiT weights: name -> path under the base URL (as facebookresearch/DiT's download.py).
OFFICIAL_CHECKPOINTS = {
    "DiT-XL-2-256x256.pt": "DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "DiT-XL-2-512x512.pt",
}
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
BASE_URL_ENV = "DIT_FAST_BASE_URL"
CACHE_DIR_ENV = "DIT_FAST_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/dit_fast"

_CHUNK = 1 << 20  # 1 MiB per read: a 2.7 GB checkpoint in ~2.7K reads


def _numpy_reconstruct():
    # numpy 2 moved numpy.core to numpy._core; pickles name whichever wrote them.
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


# Everything a checkpoint may hold besides tensors and plain containers (dict, list, tuple, str,
# numbers, OrderedDict), which weights_only accepts by itself. argparse.Namespace: DiT's training
# checkpoints store their args. numpy pieces: np.random.get_state() (a uint32 key array) in our
# training checkpoints for exact resume. Nothing here can run code when unpickled.
SAFE_GLOBALS = [
    argparse.Namespace,
    np.ndarray,
    np.dtype,
    _numpy_reconstruct(),
    type(np.dtype(np.uint32)),
    type(np.dtype(np.int64)),
    type(np.dtype(np.float64)),
    type(np.dtype(np.float32)),
]

# Names that wrappers insert into parameter keys: DDP/DeepSpeed ("module." in front), torch.compile
# ("_orig_mod." in front or per compiled block) and torch's checkpoint_wrapper.
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module")
_STATE_DICT_KEYS = ("model", "state_dict", "module")


class CheckpointError(RuntimeError):
    """A checkpoint could not be downloaded, read or fitted to the model."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled Python objects outside the allow-list; it was not loaded."""


# --------------------------------------------------------------------------- official weights

def official_checkpoint_name(image_size: int) -> str:
    """The official DiT-XL/2 checkpoint name for ``image_size`` (256 or 512)."""
    name = f"DiT-XL-2-{image_size}x{image_size}.pt"
    if name not in OFFICIAL_CHECKPOINTS:
        raise ValueError(
            f"There is no official DiT checkpoint for image size {image_size}; official sizes are "
            f"256 and 512 ({', '.join(OFFICIAL_CHECKPOINTS)}). Train your own and pass --ckpt PATH."
        )
    return name


def _cache_dir(cache_dir) -> Path:
    chosen = cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def _base_url(base_url) -> str:
    url = base_url or os.environ.get(BASE_URL_ENV) or OFFICIAL_BASE_URL
    return url if url.endswith("/") else url + "/"


def download_official(name: str, cache_dir=None, base_url=None) -> Path:
    """Path of the official checkpoint ``name`` in the cache, downloading it first if needed.

    cache_dir: argument, else $DIT_FAST_CACHE, else ~/.cache/dit_fast.
    base_url: argument, else $DIT_FAST_BASE_URL, else the official DiT URL.
    The file is streamed into a temporary file in the cache directory and renamed to its final
    name only when complete, so an interrupted download never leaves a truncated checkpoint.
    """
    if name not in OFFICIAL_CHECKPOINTS:
        raise ValueError(
            f"Unknown official DiT checkpoint {name!r}; valid names: "
            f"{', '.join(OFFICIAL_CHECKPOINTS)}. For any other file pass its path (--ckpt PATH)."
        )
    target = _cache_dir(cache_dir) / name
    if target.is_file():
        return target
    url = _base_url(base_url) + OFFICIAL_CHECKPOINTS[name]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _download(url, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, CheckpointError) as e:
        raise CheckpointError(
            f"Could not download the official checkpoint {name} from {url}: {e}.\n"
            f"If this machine is offline, download that URL elsewhere and put the file at "
            f"{target} (the cache directory; set it with ${CACHE_DIR_ENV}), or pass a checkpoint "
            f"you already have with --ckpt PATH."
        ) from e
    return target


def _download(url: str, target: Path) -> None:
    """Stream ``url`` into ``target`` atomically; a short read raises and leaves no file."""
    def write(f) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            received = 0
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"Downloading {target.name}") as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and received != expected:
                raise CheckpointError(
                    f"the download was cut off after {received} of {expected} bytes"
                )

    atomic_write(target, write)


# --------------------------------------------------------------------------- loading

# torch.load(weights_only=True) is the safety boundary; below 2.6 it had a published bypass
# (CVE-2025-32434) and torch.serialization.safe_globals did not exist yet.
MIN_SAFE_TORCH = (2, 6)


def _check_torch_version() -> None:
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_SAFE_TORCH or not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(
            f"dit_fast loads checkpoints only with torch>=2.6 (found torch {torch.__version__}): "
            "older torch.load(weights_only=True) can be bypassed by a crafted file (CVE-2025-32434). "
            "Upgrade torch (pip install 'torch>=2.6').")


def safe_torch_load(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` allowing only ``SAFE_GLOBALS`` beyond tensors.

    A file that needs anything else (a pickled class, a function such as os.system) is refused
    with ``UnsafeCheckpointError`` before any of its objects are created. Other failures say
    which: an unsupported torch, an empty / truncated file, or not a torch checkpoint at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    _check_torch_version()
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names what it refused (a GLOBAL, an unsupported opcode);
        # in a file without a zip or pickle header those are just junk bytes, not objects.
        refused = any(word in str(e).lower() for word in ("global", "unsupported", "weightsunpickler"))
        if not refused or not _has_checkpoint_header(path):
            raise CheckpointError(_format_problem(path, e)) from e
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it holds arbitrary Python objects that dit_fast does not "
            f"unpickle (only tensors, plain containers, argparse.Namespace and numpy arrays are "
            f"allowed), so it was NOT loaded. If you trust its source, re-save its tensors as a "
            f"plain state dict or .safetensors file. Details: {_detail(e)}"
        ) from e
    except Exception as e:  # junk bytes fail in many ways inside the unpickler
        raise CheckpointError(_format_problem(path, e)) from e


def _has_checkpoint_header(path: Path) -> bool:
    """torch.save writes a zip (PK) or, in the legacy format, a protocol-2+ pickle (0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _format_problem(path: Path, error: Exception) -> str:
    """What is wrong with a file torch.load could not read, judged by its first bytes."""
    head = path.read_bytes()[:16] if path.stat().st_size else b""
    if not head:
        what = "it is empty (0 bytes): an interrupted copy or download?"
    elif head.startswith(b"PK\x03\x04"):
        what = "it is a damaged or truncated torch (zip) checkpoint; copy or download it again"
    elif head[:1] == b"\x80":
        what = "it is a damaged or truncated pickle-format checkpoint; copy or download it again"
    elif len(head) > 8 and head[8:9] == b"{":
        what = "it looks like a .safetensors file; give it the .safetensors suffix"
    else:
        what = ("it is not a torch checkpoint (no zip or pickle header); pass a "
                ".pt/.pth/.bin or .safetensors file")
    return f"Could not read {path}: {what} ({type(error).__name__}: {_detail(error)})"


def _detail(error: Exception) -> str:
    # torch's message is long advice to use weights_only=False; keep only the line that says what.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for word in ("GLOBAL", "Unsupported"):
        hits = [line for line in lines if word in line]
        if hits:
            return hits[0]
    return lines[0] if lines else type(error).__name__


def load_state_dict(path_or_name, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from an official name or a checkpoint file.

    Accepts the official names (``OFFICIAL_CHECKPOINTS``, downloaded once), ``.safetensors`` and
    torch files (``.pt``/``.pth``/``.bin``) holding either a state dict or a training checkpoint
    with ``"ema"`` (used when ``prefer_ema``) / ``"model"`` / ``"state_dict"`` / ``"module"``.
    Wrapper prefixes (``module.``, ``_orig_mod.``) are removed. A diffusers DiT transformer
    (folder, pipeline folder or .safetensors in the hub layout) comes back converted to our names as
    a ``DiffusersStateDict``, which ``load_into_model`` checks against the model's config.
    """
    from dit_fast.diffusers_format import is_diffusers_checkpoint, read_diffusers_weights

    path = Path(str(path_or_name)).expanduser()
    if str(path_or_name) in OFFICIAL_CHECKPOINTS and not path.is_file():
        path = download_official(str(path_or_name))
    if is_diffusers_checkpoint(path):
        return read_diffusers_weights(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Pass a .pt/.pth/.bin/.safetensors file, a diffusers DiT "
            f"transformer folder, or one of the official names: {', '.join(OFFICIAL_CHECKPOINTS)}."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
            raise CheckpointError(f"Could not read {path} as a .safetensors file: {e}") from e
    else:
        state = _pick_state_dict(safe_torch_load(path), prefer_ema, path)
    return normalize_keys(state, source=path)


def _pick_state_dict(obj, prefer_ema: bool, path: Path) -> Mapping:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    if _is_state_dict(obj):
        return obj
    order = ("ema",) + _STATE_DICT_KEYS if prefer_ema else _STATE_DICT_KEYS + ("ema",)
    for key in order:
        if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
            return obj[key]
    raise CheckpointError(
        f"{path} is neither a state dict nor a training checkpoint with one of the entries "
        f"{', '.join(repr(k) for k in order)}; its top-level keys are: "
        f"{_truncate(sorted(map(str, obj)), 20)}."
    )


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


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
    from dit_fast.diffusers_format import DiffusersStateDict, fit_to_model

    if isinstance(state_dict, DiffusersStateDict):  # its config must fit; it has no pos_embed
        state_dict = fit_to_model(state_dict, model)
    own = model.state_dict()
    own_by_name = {_normalize_key(k): k for k in own}
    given = normalize_keys(state_dict)
    missing = sorted(k for k in own_by_name if k not in given)
    unexpected = sorted(k for k in given if k not in own_by_name)
    wrong = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(own[own_by_name[k]].shape)}"
        for k in given
        if k in own_by_name and given[k].shape != own[own_by_name[k]].shape
    )
    if missing or unexpected or wrong:
        raise CheckpointError(_mismatch_message(model, missing, unexpected, wrong, hint))
    model.load_state_dict({own_by_name[k]: v for k, v in given.items()}, strict=True)
    return model


def _mismatch_message(model, missing, unexpected, wrong, hint) -> str:
    lines = [
        f"The checkpoint does not fit the {type(model).__name__} model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected and {len(wrong)} wrong-shape keys."
    ]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            lines.append(f"  {title} ({len(items)}): {_truncate(items, 12)}")
    lines.append(hint or (
        "Hint: build the model the checkpoint was trained with (check --model, --image-size, "
        "--num-classes and learn-sigma), or pass the matching --ckpt."
    ))
    return "\n".join(lines)


# --------------------------------------------------------------------------- saving

def atomic_save(obj, path) -> Path:
    """Save ``obj`` to ``path`` so that the file is either the old one or the complete new one
    (dit_fast.atomic). A ``.safetensors`` path stores ``obj`` (a flat dict of tensors) with
    safetensors; any other path uses ``torch.save``.
    """
    if Path(path).suffix == ".safetensors":
        data = _safetensors_bytes(obj)
        return atomic_write(path, lambda f: f.write(data))
    return atomic_write(path, lambda f: torch.save(obj, f))


def _safetensors_bytes(obj) -> bytes:
    from safetensors.torch import save

    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise TypeError(
            "A .safetensors file holds a flat {name: tensor} dict only; save training "
            "checkpoints (optimizer, step, config) with a .pt path instead."
        )
    return save({k: v.contiguous() for k, v in obj.items()})
