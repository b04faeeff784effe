"""Official DiT weights: their names, the download cache, and THE one place that decides whether a
``--ckpt`` / ``--init-from`` value is an official name or a path (``is_official_name``).
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..atomic import atomic_write
from .safe_io import CheckpointError

# Official DiT weights: name -> path under the base URL (as facebookresearch/DiT's download.py).
OFFICIAL_CHECKPOINTS = {
    "DiT-XL-2-256x256.pt": "DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "DiT-XL-2-512x512.pt"}
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
BASE_URL_ENV = "DIT_FAST_BASE_URL"
CACHE_DIR_ENV = "DIT_FAST_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/dit_fast"

_CHUNK = 1 << 20  # 1 MiB per read: a 2.7 GB checkpoint in ~2.7K reads


def official_checkpoint_name(image_size: int) -> str:
    """The official DiT-XL/2 checkpoint name for ``image_size`` (256 or 512)."""
    name = f"DiT-XL-2-{image_size}x{image_size}.pt"
    if name not in OFFICIAL_CHECKPOINTS:
        raise ValueError(
            f"There is no official DiT checkpoint for image size {image_size}; official sizes are "
            f"256 and 512 ({', '.join(OFFICIAL_CHECKPOINTS)}). Train your own and pass --ckpt PATH.")
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
            f"{', '.join(OFFICIAL_CHECKPOINTS)}. For any other file pass its path (--ckpt PATH).")
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
                    f"the download was cut off after {received} of {expected} bytes")

    atomic_write(target, write)


def is_official_name(spec) -> bool:
    """True when ``spec`` means an official checkpoint: one of ``OFFICIAL_CHECKPOINTS`` and not the
    name of a file or folder that exists (a local file of that name wins)."""
    return str(spec) in OFFICIAL_CHECKPOINTS and not Path(str(spec)).expanduser().exists()


def resolve_official(spec) -> Path:
    """``spec`` as a path: an official name becomes its cached download (fetched once), anything
    else is returned as given (``~`` expanded), existing or not."""
    if is_official_name(spec):
        return download_official(str(spec))
    return Path(str(spec)).expanduser()
