"""Inception features of uint8 images, batch by batch: what every ADM metric is computed from.

    extractor = FeatureExtractor(weights="weights-inception-2015-12-05-6726825d.pth")   # or None: hub cache
    feats = extractor(images_uint8_nhwc)                 # one batch -> Features(pool, spatial, logits)
    feats = extractor.extract(batches, total=N)          # many batches, with a progress bar

Never downloads: the weights file is torch-fidelity's conversion of the 2015 TensorFlow graph, looked up
at the given path or in torch hub's cache (where torch-fidelity itself would have put it); missing, it
is an error that says where to get it -- there is no fallback to another network.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .inception import InceptionV3

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights file is not on this machine; the message says how to get it."""


def default_weights_path() -> Path:
    """Where torch-fidelity's own download lands: <torch hub dir>/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def resolve_weights(path=None) -> Path:
    """The weights file to use (`path`, else the hub cache); raises InceptionWeightsMissing."""
    candidate = Path(path) if path else default_weights_path()
    if not candidate.is_file():
        raise InceptionWeightsMissing(
            f"Inception weights not found at {candidate}: download {WEIGHTS_URL} (e.g. on a machine with "
            f"network access) and pass --inception-weights PATH, or put it at {default_weights_path()}")
    return candidate


@dataclass
class Features:
    """ADM's features of N images: pool_3 (N, 2048), spatial mixed_6/conv[..., :7] (N, 2023) and the
    unbiased logits (N, 1008), all float32, in the images' order."""
    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)

    def probs(self) -> np.ndarray:
        """Softmax of the unbiased logits in float32 (ADM's Inception Score input)."""
        return torch.softmax(torch.from_numpy(self.logits).float(), dim=1).numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pool": self.pool, "spatial": self.spatial, "logits": self.logits}

    @staticmethod
    def concat(parts: Iterable["Features"]) -> "Features":
        parts = list(parts)
        return Features(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                          ("pool", "spatial", "logits")))


@contextlib.contextmanager
def _full_fp32_convolutions():
    """cuDNN may run fp32 convolutions in TF32 by default (10-bit mantissas); the 2015 graph's
    features are fp32, so TF32 is off while we extract."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


class FeatureExtractor:
    """The 2015 Inception on `device` (CUDA when there is one), loaded from `weights` (see module doc)."""

    def __init__(self, weights=None, device=None):
        self.weights_path = resolve_weights(weights)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        net = InceptionV3()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{self.weights_path} is not the 2015 Inception's state dict "
                             f"({str(err).splitlines()[0]})") from err
        self.net = net.to(self.device).eval().requires_grad_(False)
        self._digest: Optional[str] = None

    @property
    def weights_digest(self) -> str:
        """sha256 of the weights file: part of every feature cache key."""
        if self._digest is None:
            self._digest = file_digest(self.weights_path, hashlib.sha256())
        return self._digest

    def __call__(self, images) -> Features:
        """Features of one batch of uint8 images (N, H, W, 3): numpy, or a torch tensor on any device
        (samples decoded on the GPU stay there)."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
        x = x.to(self.device)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        with torch.inference_mode(), _full_fp32_convolutions():
            out = self.net(x.permute(0, 3, 1, 2))
        return Features(*(t.float().cpu().numpy() for t in out))

    def extract(self, batches: Iterable, total: Optional[int] = None, desc: str = "Inception") -> Features:
        """Features of every batch in turn (a tqdm bar counts images when `total` is given)."""
        parts = []
        with tqdm(total=total, desc=desc, unit="img") as bar:
            for batch in batches:
                parts.append(self(batch))
                bar.update(len(batch))
        if not parts:
            raise ValueError("no images to extract features from")
        return Features.concat(parts)


def file_digest(path, hasher=None, chunk: int = 1 << 24) -> str:
    """Hex digest of a file's bytes, read in 16 MiB chunks (blake2b unless `hasher` is given)."""
    hasher = hasher or hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            hasher.update(block)
    return hasher.hexdigest()
