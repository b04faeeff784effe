"""Image batch files (.npz with `arr_0` uint8 (N, H, W, 3), ADM's format) and their cached features.

The images are streamed from the archive a batch at a time (a 50,000-image 256x256 batch is ~10 GB);
ADM's reference batches may also hold precomputed statistics (mu, sigma, mu_s, sigma_s). A file's
features are cached beside it (or in a cache folder) under a key made of its content hash and the
Inception weights' hash, so an unchanged reference batch is read through the network once.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..atomic import atomic_write
from .features import FeatureExtractor, Features, file_digest

IMAGES = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURES_VERSION = "adm-inception-2015-v1"  # bump when what is cached changes meaning


@dataclass
class BatchFile:
    """An .npz of images (maybe with ADM's statistics), validated from its headers alone."""
    path: Path
    shape: Optional[tuple]    # arr_0's shape, None when the file holds statistics only
    dtype: Optional[np.dtype]
    stats: Optional[dict]     # mu, sigma[, mu_s, sigma_s] as float64 when present

    @property
    def count(self) -> int:
        return self.shape[0] if self.shape else 0


def _npy_header(member) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read[version](member)
    if fortran:
        raise ValueError("a Fortran-ordered arr_0 cannot be streamed; save it with np.savez")
    return shape, dtype


def open_batch(path, need_images: bool = True) -> BatchFile:
    """Check `path` is an ADM batch: arr_0 integer (N, H, W, 3); raises ValueError/OSError saying why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.removesuffix(".npy") for name in archive.namelist()}
            shape = dtype = None
            if IMAGES in names:
                with archive.open(f"{IMAGES}.npy") as member:
                    shape, dtype = _npy_header(member)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not an .npz archive ({err})") from err
    stats = None
    if {"mu", "sigma"} <= names:
        with np.load(path) as data:
            stats = {key: data[key].astype(np.float64) for key in STAT_KEYS if key in names}
    if shape is None:
        if need_images or stats is None:
            raise ValueError(f"{path} has no {IMAGES} images (arrays: {sorted(names)})")
        return BatchFile(path, None, None, stats)
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (channels first? ADM batches are NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"{path}: {IMAGES} must be images (N, H, W, 3), got shape {shape}{hint}")
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{path}: {IMAGES} must hold integers 0..255 (uint8), got {dtype}; "
                         "convert floats in [-1, 1] with clip(x * 127.5 + 128, 0, 255).astype(uint8)")
    found = BatchFile(path, tuple(shape), dtype, stats)
    if dtype != np.uint8:
        _check_range(found)
    return found


def _raw_batches(batch: BatchFile, batch_size: int) -> Iterator[np.ndarray]:
    """arr_0 in its stored dtype, (B, H, W, 3) at a time, streamed from the archive."""
    per_image = int(np.prod(batch.shape[1:])) * batch.dtype.itemsize
    with zipfile.ZipFile(batch.path) as archive, archive.open(f"{IMAGES}.npy") as member:
        _npy_header(member)
        for start in range(0, batch.count, batch_size):
            n = min(batch_size, batch.count - start)
            raw = member.read(n * per_image)
            if len(raw) != n * per_image:
                raise ValueError(f"{batch.path}: {IMAGES} ends early (truncated file?)")
            # a bytearray keeps the array writable (torch warns on read-only numpy memory)
            yield np.frombuffer(bytearray(raw), dtype=batch.dtype).reshape(n, *batch.shape[1:])


def _check_range(batch: BatchFile, batch_size: int = 256) -> None:
    """Integers wider than uint8 must lie in 0..255: one pass before any feature is computed."""
    low = min(int(images.min()) for images in _raw_batches(batch, batch_size))
    high = max(int(images.max()) for images in _raw_batches(batch, batch_size))
    if low < 0 or high > 255:
        raise ValueError(f"{batch.path}: {IMAGES} values must lie in 0..255, found {low}..{high}")


def read_batches(batch: BatchFile, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) arrays in file order, streamed from the archive."""
    for images in _raw_batches(batch, batch_size):
        yield images if images.dtype == np.uint8 else images.astype(np.uint8)


def cache_path(batch: BatchFile, key: str, cache_dir=None) -> Path:
    folder = Path(cache_dir) if cache_dir else batch.path.parent
    return folder / f"{batch.path.stem}.inception-{key[:20]}.npz"


def cached_features(batch: BatchFile, extractor: FeatureExtractor, *, batch_size: int = 100,
                    cache_dir=None, use_cache: bool = True, log=print) -> tuple[Features, bool]:
    """(features of the batch's images, whether they came from the cache)."""
    if not use_cache:
        return extractor.extract(read_batches(batch, batch_size), batch.count, desc=batch.path.name), False
    key = f"{file_digest(batch.path)}-{extractor.weights_digest[:20]}-{FEATURES_VERSION}"
    target = cache_path(batch, key, cache_dir)
    if target.is_file():
        with np.load(target) as data:
            if str(data["key"]) == key:
                log(f"{batch.path.name}: features read from the cache {target}")
                return Features(data["pool"], data["spatial"], data["logits"]), True
    feats = extractor.extract(read_batches(batch, batch_size), batch.count, desc=batch.path.name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda f: np.savez(f, key=np.array(key), **feats.arrays()))
        log(f"{batch.path.name}: features cached in {target}")
    except OSError as err:  # a read-only folder beside a shared reference batch: say so, go on
        log(f"{batch.path.name}: features not cached ({err}); pass --cache-dir to keep them")
    return feats, False
