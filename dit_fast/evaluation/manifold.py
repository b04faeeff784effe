"""Improved precision and recall (Kynkäänniemi et al. 2019, arXiv 1904.06991) as ADM's evaluator runs it.

Each set's manifold is the union of balls around its points; a point's radius is its SQUARED Euclidean
distance to its k-th nearest neighbour counted with itself at rank 0 (the (k+1)-th smallest of its row).
Precision = share of samples inside the reference manifold (within some reference point's radius, `<=`);
recall = share of reference points inside the sample manifold.

Arithmetic: ADM casts the features to fp16 and computes ||u||^2 - 2 u.v + ||v||^2 there, falling back to
fp32 for a block whose fp16 distances are not all finite. Here "fp64" (the default) computes the same
expansion in float64, "fp32" in float32, and "adm-fp16" re-creates ADM's rounding on a GPU (fp16
squares, norms summed in fp32 then rounded to fp16, an fp16 GEMM accumulated in fp32, each later
add/sub rounded to fp16, the fp32 fallback) -- to measure what the fp16 rounding changes (README).
"""
from __future__ import annotations

import numpy as np
import torch

from .metrics import ARITHMETICS

ROW_BLOCK = 4096  # rows of the distance matrix held at once: 4096 x 50,000 fp64 = 1.6 GB


def _expanded(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """max(||u_i||^2 - 2 u_i.v_j + ||v_j||^2, 0) in the inputs' dtype."""
    nu = (u * u).sum(1, keepdim=True)
    nv = (v * v).sum(1, keepdim=True).T
    return torch.clamp(nu - 2 * (u @ v.T) + nv, min=0)


def _adm_fp16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's fp16 block (see the module docstring), as float32; its fp32 fallback when not finite."""
    u16, v16 = u.half(), v.half()
    nu = (u16 * u16).float().sum(1, keepdim=True).half()
    nv = (v16 * v16).float().sum(1, keepdim=True).T.half()
    cross = (u16.float() @ v16.float().T).half()
    d = torch.clamp((nu - 2 * cross) + nv, min=0)
    if not torch.isfinite(d).all():
        return _expanded(u.float(), v.float())
    return d.float()


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, arithmetic: str = "fp64") -> torch.Tensor:
    """Squared Euclidean distances (len(u), len(v)) in the named arithmetic (fp64 | fp32 | adm-fp16)."""
    if arithmetic == "fp64":
        return _expanded(u.double(), v.double())
    if arithmetic == "fp32":
        return _expanded(u.float(), v.float())
    if arithmetic == "adm-fp16":
        return _adm_fp16(u.float(), v.float())
    raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")


def manifold_radii(features: torch.Tensor, k: int, arithmetic: str = "fp64") -> torch.Tensor:
    """(N,) squared distance of each point to its k-th nearest neighbour (itself is the 0-th)."""
    radii = []
    for start in range(0, len(features), ROW_BLOCK):
        d = pairwise_sq_distances(features[start:start + ROW_BLOCK], features, arithmetic)
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_features, sample_features, k: int = 3, *, arithmetic: str = "fp64",
                     device=None) -> tuple[float, float]:
    """(precision, recall) of samples (N2, D) against references (N1, D) with k nearest neighbours.

    Both sets need more than k points. `device` defaults to CUDA when there is one.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = torch.as_tensor(np.asarray(ref_features), device=device)
    sample = torch.as_tensor(np.asarray(sample_features), device=device)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) features of one width, got {tuple(ref.shape)} "
                         f"and {tuple(sample.shape)}")
    if k < 1 or min(len(ref), len(sample)) <= k:
        raise ValueError(f"precision_recall with k={k} needs more than {k} points in each set, got "
                         f"{len(ref)} reference and {len(sample)} sample features")
    ref_radii = manifold_radii(ref, k, arithmetic)
    sample_radii = manifold_radii(sample, k, arithmetic)
    sample_inside = torch.zeros(len(sample), dtype=torch.bool, device=device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    for start in range(0, len(sample), ROW_BLOCK):
        d = pairwise_sq_distances(sample[start:start + ROW_BLOCK], ref, arithmetic)  # (B, N1)
        sample_inside[start:start + ROW_BLOCK] = (d <= ref_radii[None, :].to(d.dtype)).any(dim=1)
        radii = sample_radii[start:start + ROW_BLOCK, None].to(d.dtype)
        ref_inside |= (d <= radii).any(dim=0)
    return float(sample_inside.double().mean()), float(ref_inside.double().mean())
