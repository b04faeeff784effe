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
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start:start + batch]).to(device).permute(0, 3, 1, 2).float() / 255
            feats.append(model(x)[0].squeeze(-1).squeeze(-1).double().cpu().numpy())  # (B, 2048)
    feats = np.concatenate(feats)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), the FID formula (offset on a singular product)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


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
