"""Packed latent storage: a few large .npy shards plus index.json, read with memory mapping.

Layout of a features directory (written by extract_features.py or ``write_latent_dataset``)::

    index.json                    format, version, num_images, latent_shape [C, h, w], dtype,
                                  class_names, num_classes, image_size, vae, latent_scale, flips,
                                  shards [{name, count}], num_skipped, latent_norm (below)
    shard-00000.latents.npy       (n, 2, C, h, w) float32|float16: [:, 0] the image, [:, 1] its
                                  horizontal flip (the trainer picks one per visit)
    shard-00000.images.npy        only with --keep-images: (n, C, S, S) uint8, the cropped image
                                  that slot 0 encodes (slot 1's image is its mirror, made on read);
                                  index.json then has image_shape [C, S, S]
    shard-00000.labels.npy        (n,) int64
    shard-00000.meta.json         count, skipped paths and the settings fingerprint; written last,
                                  so its presence marks a finished shard (resume skips it)
    skipped.txt                   images that could not be read, one "path<TAB>reason" a line

Pixel-space data (``--vae none``) uses the same layout with the [-1, 1] pixels as "latents".

``latent_norm`` (dit_fast.latent_norm) says what the shards hold: ``{"mode": "config", "scale",
"shift"}``: latents already normalised with the VAE config's numbers (SD: * 0.18215; also in
``latent_scale``); ``{"mode": "channel", "mean", "std"}`` (format version 2, so older readers refuse
it): raw latents, normalised per channel on read by LatentDataset. Absent (older directories):
``latent_scale`` alone, config mode without shift.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write, atomic_write_text, publish
from ..latent_norm import LatentNorm

INDEX_NAME = "index.json"
FORMAT_NAME = "dit_fast.latents"
FORMAT_VERSION = 2  # 2: per-channel latent normalisation; written only when used (else 1)
STORAGE_DTYPES = ("float32", "float16")
_INDEX_KEYS = ("format", "version", "num_images", "latent_shape", "dtype", "class_names",
               "image_size", "vae", "shards")
_RUN_EXTRACT = "run extract_features.py --data-path <images> --features-path <this dir> first"


def shard_name(shard: int) -> str:
    """Base name of shard number ``shard`` (``shard-00000``)."""
    return f"shard-{shard:05d}"


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    """index.json / meta.json, written atomically (dit_fast.atomic)."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_save_npy(arr: np.ndarray, path: str | os.PathLike) -> None:
    """np.save, atomically (dit_fast.atomic)."""
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(arr)))


def open_shard_writer(out_dir: str | os.PathLike, shard: int, capacity: int,
                      per_item_shape: tuple[int, ...], dtype: str, kind: str = "latents") -> np.memmap:
    """A writable memory-mapped temp .npy of shape (capacity, *per_item_shape) for one shard's
    ``kind`` ("latents" or "images").

    Filling the shard through a memmap keeps host memory flat even for pixel-space shards of
    several GB; ``finish_shard`` renames it into place.
    """
    # ".partial", not ".tmp": finish_shard may write the final file via a .tmp of its own.
    tmp = Path(out_dir) / f".{shard_name(shard)}.{kind}.npy.partial{os.getpid()}"
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                     shape=(capacity, *per_item_shape))


def finish_shard(out_dir: str | os.PathLike, shard: int, buf: np.memmap, count: int,
                 labels: np.ndarray, meta: dict, images: np.memmap | None = None) -> None:
    """Make a shard final: latents (and images), then labels, then meta.json (the completion
    marker, which records ``image_shape`` when the shard has images)."""
    out_dir = Path(out_dir)
    name = shard_name(shard)
    _publish_rows(buf, count, out_dir / f"{name}.latents.npy")
    if images is not None:
        _publish_rows(images, count, out_dir / f"{name}.images.npy")
        meta = dict(meta, image_shape=list(images.shape[1:]))
    atomic_save_npy(np.asarray(labels, dtype=np.int64), out_dir / f"{name}.labels.npy")
    atomic_write_json(dict(meta, count=int(count)), out_dir / f"{name}.meta.json")


def _publish_rows(buf: np.memmap, count: int, final: Path) -> None:
    """Move the first ``count`` rows of a filled writer buffer to ``final``."""
    tmp = Path(buf.filename)
    buf.flush()
    if count < buf.shape[0]:  # images were skipped: rewrite with the exact row count
        atomic_save_npy(np.asarray(buf[:count]), final)
        tmp.unlink()
    else:
        publish(tmp, final)


def shard_kinds(meta: dict) -> tuple[str, ...]:
    """The .npy files a finished shard with this meta has."""
    return ("latents", "labels") + (("images",) if meta.get("image_shape") else ())


def read_shard_meta(out_dir: str | os.PathLike, shard: int) -> dict | None:
    """The meta of a finished shard, or None when the shard is missing or unfinished."""
    out_dir = Path(out_dir)
    name = shard_name(shard)
    meta_path = out_dir / f"{name}.meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not all((out_dir / f"{name}.{kind}.npy").exists() for kind in shard_kinds(meta)):
        return None  # a file was removed after the fact: recompute this shard
    return meta


def write_latent_dataset(out_dir: str | os.PathLike, latents, labels, *, class_names,
                         image_size: int, vae: str = "none", flips: str = "horizontal",
                         dtype: str = "float32", shard_size: int = 4096,
                         latent_scale: float | None = None, images=None,
                         latent_norm: dict | None = None) -> Path:
    """Write in-memory (N, 2, C, h, w) latents and (N,) labels in the packed format, and the
    (N, C, S, S) uint8 images when given (as ``--keep-images`` stores them).

    For tests, the bundled demo, and anyone with features from elsewhere. ``flips`` documents
    what slot 1 holds: "horizontal" (the flipped image) or "duplicate" (the same image twice).
    """
    latents = np.asarray(latents)
    labels = np.asarray(labels, dtype=np.int64)
    if latents.ndim != 5 or latents.shape[1] != 2:
        raise ValueError(f"latents must be (N, 2, C, h, w), got {latents.shape}")
    if labels.shape != (latents.shape[0],):
        raise ValueError(f"labels must be ({latents.shape[0]},), got {labels.shape}")
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images must be uint8 ({len(labels)}, C, S, S), got {images.dtype} "
                             f"{images.shape}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, start in enumerate(range(0, len(labels), shard_size)):
        stop = min(start + shard_size, len(labels))
        buf = open_shard_writer(out_dir, shard, stop - start, latents.shape[1:], dtype)
        buf[:] = latents[start:stop]
        pixels = None
        if images is not None:
            pixels = open_shard_writer(out_dir, shard, stop - start, images.shape[1:], "uint8",
                                       kind="images")
            pixels[:] = images[start:stop]
        finish_shard(out_dir, shard, buf, stop - start, labels[start:stop], {"skipped": []},
                     images=pixels)
        shards.append({"name": shard_name(shard), "count": stop - start})
    write_index(out_dir, shards=shards, latent_shape=latents.shape[2:], dtype=dtype,
                class_names=class_names, image_size=image_size, vae=vae, flips=flips,
                latent_scale=latent_scale, latent_norm=latent_norm,
                image_shape=None if images is None else images.shape[1:])
    return out_dir


def write_index(out_dir: str | os.PathLike, *, shards: list[dict], latent_shape, dtype: str,
                class_names, image_size: int, vae: str, flips: str = "horizontal",
                latent_scale: float | None = None, num_skipped: int = 0, image_shape=None,
                latent_norm: dict | None = None, **extra) -> dict:
    """Write index.json atomically (the last step: a directory without it is unfinished).
    ``image_shape`` [C, S, S]: the shards also hold the uint8 images (``--keep-images``).
    ``latent_norm``: a LatentNorm record (default: config mode at ``latent_scale`` when given)."""
    if latent_norm is None and latent_scale is not None:
        latent_norm = LatentNorm("config", scale=float(latent_scale)).to_dict()
    if latent_norm is not None and latent_norm.get("mode") == "config":
        latent_scale = latent_norm["scale"]
    channel = latent_norm is not None and latent_norm.get("mode") == "channel"
    index = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION if channel else 1,
        "num_images": int(sum(s["count"] for s in shards)),
        "latent_shape": [int(v) for v in latent_shape], "dtype": dtype,
        "class_names": [str(c) for c in class_names], "num_classes": len(class_names),
        "image_size": int(image_size), "vae": vae, "latent_scale": latent_scale,
        "flips": flips, "shards": shards, "num_skipped": int(num_skipped), **extra,
    }
    if latent_norm is not None:  # absent otherwise, as before the field existed
        index["latent_norm"] = latent_norm
    if image_shape is not None:  # absent otherwise: an index without images reads as before
        index["image_shape"] = [int(v) for v in image_shape]
    atomic_write_json(index, Path(out_dir) / INDEX_NAME)
    return index


def read_index(path: str | os.PathLike) -> dict:
    """Load and validate index.json of a features directory, with errors that say what to do."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"features path {str(path)!r} does not exist; {_RUN_EXTRACT}")
    if not path.is_dir():
        raise NotADirectoryError(f"features path {str(path)!r} is not a directory; "
                                 "it must be the folder extract_features.py wrote")
    index_path = path / INDEX_NAME
    if not index_path.exists():
        if any(path.glob("shard-*.meta.json")):
            raise FileNotFoundError(
                f"{str(path)!r} holds shards but no {INDEX_NAME}: the extraction did not finish. "
                "Rerun extract_features.py with the same arguments; it keeps the finished shards.")
        raise FileNotFoundError(f"no {INDEX_NAME} in {str(path)!r} (empty or not a features "
                                f"directory); {_RUN_EXTRACT}")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt {index_path}: {err}. Delete it and rerun extract_features.py "
                         "with the same arguments (finished shards are kept).") from err
    missing = [k for k in _INDEX_KEYS if not isinstance(index, dict) or k not in index]
    if missing or index.get("format") != FORMAT_NAME:
        raise ValueError(f"corrupt or foreign {index_path}: missing keys {missing} or format "
                         f"{index.get('format') if isinstance(index, dict) else None!r} != "
                         f"{FORMAT_NAME!r}; rerun extract_features.py")
    if index["version"] > FORMAT_VERSION:
        raise ValueError(f"{index_path} has format version {index['version']}, this dit_fast "
                         f"reads up to {FORMAT_VERSION}; upgrade dit_fast")
    if index["num_images"] <= 0:
        raise ValueError(f"{str(path)!r} holds no images (num_images=0); check the source images "
                         "and skipped.txt, then rerun extract_features.py")
    return index


def index_latent_norm(index: dict, where: str) -> LatentNorm | None:
    """The LatentNorm an index records (None: pixel space or no record); an index that claims a
    mode without its numbers is a ValueError saying to extract again."""
    if "latent_norm" in index:
        return LatentNorm.from_dict(index["latent_norm"], where=where)
    scale = index.get("latent_scale")
    return None if scale is None else LatentNorm("config", scale=float(scale))


class LatentDataset(torch.utils.data.Dataset):
    """Memory-mapped packed latents -> (latents float32 (2, C, h, w), label int).

    Slot 0 is the image, slot 1 its horizontal flip (the same image twice when
    ``flips == "duplicate"``). Attributes: ``latent_shape`` (C, h, w), ``num_classes``,
    ``class_names``, ``image_size``, ``vae``, ``latent_scale``, ``latent_norm`` (a LatentNorm or
    None; in channel mode every read is normalised with it), ``flips``, ``labels`` (int64 array),
    ``image_shape`` ((C, S, S) when the shards hold images, else None; see ``get_image``).
    All files are checked here, so a broken directory fails before any training step.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = read_index(self.path)
        self.index = index
        self.latent_shape = tuple(int(v) for v in index["latent_shape"])
        self.class_names = list(index["class_names"])
        self.num_classes = len(self.class_names)
        self.image_size = int(index["image_size"])
        self.vae = index["vae"]
        self.latent_scale = index.get("latent_scale")
        self.latent_norm = index_latent_norm(index, f"{self.path / INDEX_NAME}")
        if self.latent_norm is not None and self.latent_norm.channels not in (None, self.latent_shape[0]):
            raise ValueError(f"{self.path / INDEX_NAME}: {self.latent_norm.channels} per-channel "
                             f"statistics for {self.latent_shape[0]} latent channels; extract again")
        # Shards of channel mode hold raw latents: normalise on read (config mode: stored normalised).
        self._on_read = self.latent_norm if self.latent_norm and self.latent_norm.mode == "channel" else None
        self.flips = index.get("flips", "horizontal")
        self.dtype = index["dtype"]
        shape = index.get("image_shape")
        self.image_shape = tuple(int(v) for v in shape) if shape else None
        self._shard_names = [s["name"] for s in index["shards"]]
        counts = [int(s["count"]) for s in index["shards"]]
        self._starts = np.cumsum([0] + counts).tolist()
        self.labels = np.concatenate([self._check_shard(n, c) for n, c in
                                      zip(self._shard_names, counts)] or [np.zeros(0, np.int64)])
        self._mmaps: dict[tuple[str, int], np.ndarray] = {}

    def _check_shard(self, name: str, count: int) -> np.ndarray:
        kinds = ("latents", "labels") + (("images",) if self.image_shape else ())
        files = {k: self.path / f"{name}.{k}.npy" for k in kinds}
        for f in files.values():
            if not f.exists():
                raise FileNotFoundError(f"shard file {str(f)!r} listed in {INDEX_NAME} is missing; "
                                        "rerun extract_features.py with the same arguments")
        try:
            lat = np.load(files["latents"], mmap_mode="r")
            labels = np.load(files["labels"])
            images = np.load(files["images"], mmap_mode="r") if self.image_shape else None
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read shard {name} in {str(self.path)!r}: {err}; delete its "
                             "files and rerun extract_features.py") from err
        want = (count, 2, *self.latent_shape)
        if lat.shape != want or labels.shape != (count,):
            raise ValueError(f"shard {name}: latents {lat.shape} / labels {labels.shape}, but "
                             f"{INDEX_NAME} says {want} / ({count},); delete the shard's files "
                             "and rerun extract_features.py")
        if images is not None and (images.shape != (count, *self.image_shape)
                                   or images.dtype != np.uint8):
            raise ValueError(f"shard {name}: images {images.dtype} {images.shape}, but {INDEX_NAME} "
                             f"says uint8 {(count, *self.image_shape)}; delete the shard's files "
                             "and rerun extract_features.py --keep-images")
        return labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, k: int, kind: str = "latents") -> np.ndarray:
        if (kind, k) not in self._mmaps:  # opened lazily so DataLoader workers each map their own
            self._mmaps[kind, k] = np.load(self.path / f"{self._shard_names[k]}.{kind}.npy",
                                           mmap_mode="r")
        return self._mmaps[kind, k]

    def __getstate__(self):
        # Pickling a memmap copies its data; workers reopen the files instead.
        return {**self.__dict__, "_mmaps": {}}

    def _locate(self, i: int) -> tuple[int, int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        k = bisect.bisect_right(self._starts, i) - 1  # empty shards share a start: take the last
        return i, k, i - self._starts[k]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i, k, j = self._locate(i)
        row = torch.from_numpy(np.array(self._shard(k)[j], dtype=np.float32))  # (2, C, h, w)
        return self._normalized(row), int(self.labels[i])

    def _normalized(self, z: torch.Tensor) -> torch.Tensor:
        return z if self._on_read is None else self._on_read.normalize(z)

    def get(self, i: int, flip: int) -> tuple[torch.Tensor, int]:
        """One slot only, (latents float32 (C, h, w), label): half the reads of ``self[i]``."""
        if flip not in (0, 1):
            raise ValueError(f"flip must be 0 (image) or 1 (mirror), got {flip!r}")
        i, k, j = self._locate(i)
        row = torch.from_numpy(np.array(self._shard(k)[j, flip], dtype=np.float32))  # (C, h, w)
        return self._normalized(row), int(self.labels[i])

    def get_image(self, i: int, flip: int) -> torch.Tensor:
        """The uint8 (C, S, S) image whose latents are ``get(i, flip)``: slot 1 is its mirror
        (the image itself when ``flips == "duplicate"``)."""
        if self.image_shape is None:
            raise ValueError(f"{str(self.path)!r} holds no images; extract the features with "
                             "--keep-images for REPA")
        if flip not in (0, 1):
            raise ValueError(f"flip must be 0 (image) or 1 (mirror), got {flip!r}")
        _, k, j = self._locate(i)
        image = self._shard(k, "images")[j]                       # (C, S, S) uint8, memory-mapped
        mirrored = flip and self.flips == "horizontal"
        return torch.from_numpy(np.array(image[..., ::-1] if mirrored else image))

    def check_labels(self, num_classes: int) -> None:
        """Raise ValueError naming each label value outside [0, num_classes) and its count."""
        check_labels(self.labels, num_classes, source=str(self.path))


def check_labels(labels, num_classes: int, source: str = "the data") -> None:
    """Raise ValueError naming each label value outside [0, num_classes) and how often it occurs."""
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values, counts = np.unique(labels[bad], return_counts=True)
        listed = ", ".join(f"label {v} x {c}" for v, c in list(zip(values, counts))[:10])
        fix = (f"pass --num-classes {int(labels.max()) + 1} or higher" if labels.min() >= 0
               else "labels must be non-negative: extract the features again")
        raise ValueError(
            f"{int(bad.sum())} labels in {source} are outside [0, {num_classes}): {listed}"
            f"{' ...' if len(values) > 10 else ''}; {fix}")
