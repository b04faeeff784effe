"""ADM's evaluation metrics on features: Fréchet distance (FID, sFID), Inception Score, precision/recall.

The definitions are those of openai/guided-diffusion `evaluations/evaluator.py` (the suite every
DiT-family paper reports); where our arithmetic differs from it, the docstring says how and by how much.

    mu, sigma = statistics(pool_features)                       # (D,), (D, D) float64
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    isc = inception_score(softmax_rows, split_size=5000)
    precision, recall = precision_recall(ref_pool, sample_pool, k=3)
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

SINGULAR_OFFSET = 1e-6  # ADM's diagonal offset when sqrtm(S1 S2) is not finite
IMAGINARY_TOLERANCE = 1e-3  # ADM's bound on the imaginary part of sqrtm's diagonal
ARITHMETICS = ("fp64", "fp32", "adm-fp16")


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 (ADM: np.mean, np.cov)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"statistics need features of shape (N >= 2, D), got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of N(mu1, S1) and N(mu2, S2): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)).

    As ADM computes it: scipy's sqrtm of the product; when that is not finite, both covariances get
    1e-6 on the diagonal (with a warning); an imaginary part is dropped when the diagonal's is below
    1e-3 and is an error otherwise (a broken covariance, not round-off).
    """
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
                         f"{sigma2.shape}")
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        warnings.warn(f"sqrtm(S1 S2) is singular: adding {SINGULAR_OFFSET} to both covariances' diagonals")
        offset = np.eye(len(sigma1)) * SINGULAR_OFFSET
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=IMAGINARY_TOLERANCE):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component of {np.abs(root.imag).max():.3g}: "
                             "the covariances are not positive semi-definite")
        root = root.real
    gap = mu1 - mu2
    return float(gap @ gap + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


def inception_score(probs, split_size: int = 5000) -> float:
    """ADM's Inception Score: the rows (N, C) in consecutive chunks of `split_size` (the last may be
    shorter); per chunk exp(mean_i KL(p_i || mean_j p_j)); the MEAN over chunks (no spread reported).

    Computed in the rows' own float precision (ADM's softmax is float32), with 0 log 0 read as 0 where
    ADM would produce NaN (a probability that underflowed to exactly zero).
    """
    p = np.asarray(probs)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"inception_score needs softmax rows (N >= 1, classes), got shape {p.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    p = p.astype(np.promote_types(p.dtype, np.float32), copy=False)
    per_split = []
    for start in range(0, len(p), split_size):
        part = p[start:start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0)
        per_split.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(per_split))
