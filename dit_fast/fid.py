"""Optional in-process FID of a sample .npz against reference statistics (never downloads anything).

Uses pytorch-fid's Inception network when the package and its weights are already on this machine; the
number is then pytorch-fid's FID, close to but not identical with the ADM suite's TensorFlow Inception
(use openai/guided-diffusion/evaluations for numbers to publish).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
HOW_TO = (
    "To report FID here: pip install pytorch-fid, then put its Inception weights in the torch hub cache "
    f"({{hub}}/checkpoints/{PYTORCH_FID_WEIGHTS}; e.g. run `python -m pytorch_fid --help` once with network "
    "access, or copy the file there). Reference statistics are an .npz with mu and sigma (e.g. ADM's "
    "VIRTUAL_imagenet256_labeled.npz). Or evaluate the .npz with openai/guided-diffusion/evaluations."
)


class FIDUnavailable(RuntimeError):
    """FID cannot be computed offline here; the message says what to install or download."""


def _inception(device):
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError as e:
        raise FIDUnavailable("pytorch-fid is not installed. " + HOW_TO.format(hub=torch.hub.get_dir())) from e
    weights = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_WEIGHTS
    if not weights.is_file():
        raise FIDUnavailable(f"pytorch-fid's Inception weights are not cached at {weights}. "
                             + HOW_TO.format(hub=torch.hub.get_dir()))
    return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()


def _statistics(images: np.ndarray, model, device, batch: int = 100):
    feats = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start:start + batch]).to(device).permute(0, 3, 1, 2).float() / 255
            feats.append(model(x)[0].squeeze(-1).squeeze(-1).double().cpu().numpy())  # (B, 2048)
    feats = np.concatenate(feats)
    return feats.mean(0), np.cov(feats, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (negative round-off eigenvalues read as 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of N(mu1, S1) and N(mu2, S2): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    The trace of (S1 S2)^1/2 equals that of (R S2 R)^1/2 with R = S1^1/2 (the two products are
    similar), and R S2 R is symmetric positive semi-definite: its eigenvalues are real and >= 0, so
    the trace is the sum of their square roots -- no complex round-off to discard and no diagonal
    offset needed when a covariance is singular (dead ReLU units, fewer samples than features).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
                         f"{sigma2.shape}")
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    gap = mu1 - mu2
    return float(gap @ gap + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_npz(sample_npz, ref_npz, device="cpu") -> float | None:
    """FID of arr_0 in `sample_npz` against mu/sigma in `ref_npz`; prints it. Returns None (after
    printing how to enable it) when pytorch-fid or its weights are missing."""
    ref = np.load(ref_npz)
    if "mu" not in ref or "sigma" not in ref:
        raise ValueError(f"{ref_npz} has no 'mu' and 'sigma' arrays (keys: {list(ref.keys())}); "
                         f"pass reference statistics, not images")
    try:
        model = _inception(device)
    except FIDUnavailable as e:
        print(f"FID skipped: {e}")
        return None
    mu, sigma = _statistics(np.load(sample_npz)["arr_0"], model, device)
    fid = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    print(f"FID (pytorch-fid Inception) against {ref_npz}: {fid:.3f}")
    return fid
