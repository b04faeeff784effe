"""The leaf of weights I/O: safe loading (never unpickling arbitrary objects) and atomic saving.

Loading never unpickles arbitrary Python objects: ``.pt`` files go through
``torch.load(weights_only=True)`` with a short, explicit allow-list (``SAFE_GLOBALS``), and
``.safetensors`` files hold tensors only. Saving goes through dit_fast.atomic (temp file,
fsync, rename, fsync of the directory), so a crash mid-write never destroys the previous file.
Imports nothing of dit_fast but dit_fast.atomic, so every other module may import it.
"""
from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write


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

class CheckpointError(RuntimeError):
    """A checkpoint could not be downloaded, read or fitted to the model."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled Python objects outside the allow-list; it was not loaded."""


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


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (on the CPU); a truncated or foreign file is a
    CheckpointError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
        raise CheckpointError(f"Could not read {path} as a .safetensors file: {e}") from e


def is_state_dict(obj: Mapping) -> bool:
    """A non-empty flat ``{name: tensor}`` mapping."""
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


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

    if not isinstance(obj, Mapping) or not is_state_dict(obj):
        raise TypeError(
            "A .safetensors file holds a flat {name: tensor} dict only; save training "
            "checkpoints (optimizer, step, config) with a .pt path instead."
        )
    return save({k: v.contiguous() for k, v in obj.items()})
