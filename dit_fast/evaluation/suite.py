"""ADM's evaluation suite end to end: features -> FID, sFID, Inception Score, precision, recall.

    metrics = evaluate_features(sample_feats, ref_feats)                  # any features, any source
    metrics = evaluate_npz("VIRTUAL_imagenet256_labeled.npz", "samples.npz", weights=PATH)
    feats = gather_features(local_feats)        # under torch.distributed: every rank's, rank-major
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_text
from .batches import BatchFile, cached_features, open_batch
from .features import FeatureExtractor, Features, resolve_weights
from .manifold import precision_recall
from .metrics import frechet_distance, inception_score, statistics

ADM_BATCH_SIZE = 64  # images per Inception batch in ADM's evaluator


def minimum_images(k: int) -> int:
    """Fewest images a batch needs: k neighbours besides itself for precision/recall (and >= 2 for a
    covariance)."""
    return max(k + 1, 2)


def check_reference(path, weights, flag: str, num_samples: Optional[int] = None) -> None:
    """Before anything is sampled (sample_ddp.py --evaluate, train.py --eval-ref): the reference
    batch's headers and size, the number of samples, the Inception weights file and scipy (FID's
    sqrtm), each a one-line error naming ``flag`` -- not a failure after hours of sampling."""
    from ..cli import flag_named
    try:
        import scipy.linalg  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{flag} needs scipy for FID: pip install 'dit-fast[eval]'") from err
    with flag_named(flag):
        ref = open_batch(path, need_images=False)
    need = minimum_images(3)
    if ref.shape is not None and ref.count < need:
        raise ValueError(f"{flag} {ref.path} has {ref.count} images; precision and recall need >= {need}")
    if num_samples is not None and num_samples < need:
        raise ValueError(f"{flag} needs --num-fid-samples >= {need} (precision and recall, k=3)")
    resolve_weights(weights)


def evaluate_features(sample: Features, ref: Optional[Features], ref_stats: Optional[dict] = None, *,
                      k: int = 3, split_size: int = 5000, arithmetic: str = "fp64", device=None) -> dict:
    """ADM's metrics of `sample` against `ref`: {inception_score, fid, sfid, precision, recall}.

    `ref_stats` (mu, sigma[, mu_s, sigma_s], e.g. an ADM reference batch's own) replace those computed
    from `ref`; without `ref` (statistics only) precision and recall are left out, and sFID without
    mu_s/sigma_s.
    """
    stats = dict(ref_stats or {})
    if ref is not None and "mu" not in stats:
        stats["mu"], stats["sigma"] = statistics(ref.pool)
    if ref is not None and "mu_s" not in stats:
        stats["mu_s"], stats["sigma_s"] = statistics(ref.spatial)
    metrics = {"inception_score": inception_score(sample.probs(), split_size),
               "fid": frechet_distance(*statistics(sample.pool), stats["mu"], stats["sigma"])}
    if stats.get("mu_s") is not None:
        metrics["sfid"] = frechet_distance(*statistics(sample.spatial), stats["mu_s"], stats["sigma_s"])
    if ref is not None:
        metrics["precision"], metrics["recall"] = precision_recall(ref.pool, sample.pool, k,
                                                                   arithmetic=arithmetic, device=device)
    return metrics


def _check_counts(ref: BatchFile, sample: BatchFile, k: int) -> None:
    need = minimum_images(k)
    for role, batch in (("reference", ref), ("sample", sample)):
        if batch.shape is not None and batch.count < need:
            raise ValueError(f"the {role} batch {batch.path} has {batch.count} images; precision and recall "
                             f"with k={k} need at least {need}")


def default_json_path(sample_path) -> Path:
    """<samples>.evaluation.json beside the sample batch."""
    sample_path = Path(sample_path)
    return sample_path.with_name(f"{sample_path.stem}.evaluation.json")


def evaluate_npz(ref_path, sample_path, *, weights=None, extractor: Optional[FeatureExtractor] = None,
                 device=None, batch_size: int = ADM_BATCH_SIZE, cache_dir=None, use_cache: bool = True,
                 k: int = 3, split_size: int = 5000, arithmetic: str = "fp64", json_path=None,
                 log=print) -> dict:
    """Evaluate an ADM sample batch against a reference batch; prints and writes the metrics as JSON
    (default: beside the samples). Everything is validated before the first image is read."""
    ref, sample = open_batch(ref_path, need_images=False), open_batch(sample_path)
    _check_counts(ref, sample, k)
    if extractor is None:
        resolve_weights(weights)  # a missing file is reported before the network is built
        extractor = FeatureExtractor(weights, device=device)
    started = time.perf_counter()
    options = dict(batch_size=batch_size, cache_dir=cache_dir, use_cache=use_cache, log=log)
    ref_feats, ref_cached = (cached_features(ref, extractor, **options) if ref.shape else (None, False))
    sample_feats, _ = cached_features(sample, extractor, **options)
    metrics = evaluate_features(sample_feats, ref_feats, ref.stats, k=k, split_size=split_size,
                                arithmetic=arithmetic, device=device)
    if ref_feats is None:
        log(f"{ref.path.name} holds statistics only: precision and recall need its images")
    result = {**metrics, "reference": str(ref.path), "samples": str(sample.path),
              "num_reference": ref.count, "num_samples": sample.count,
              "reference_statistics": "file" if ref.stats else "images", "reference_features_cached": ref_cached,
              "inception_weights": str(extractor.weights_path), "distance_arithmetic": arithmetic,
              "k": k, "split_size": split_size, "seconds": round(time.perf_counter() - started, 3)}
    target = Path(json_path) if json_path else default_json_path(sample.path)
    atomic_write_text(target, json.dumps(result, indent=2) + "\n")
    log(format_metrics(metrics) + f"  (written to {target})")
    return result


def format_metrics(metrics: dict) -> str:
    names = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
             "recall": "Recall"}
    return ", ".join(f"{label}: {metrics[key]:.4f}" for key, label in names.items() if key in metrics)


def gather_features(local: Features, group=None) -> Features:
    """Every rank's features, concatenated in rank order (the same on every rank). Only features
    travel (N x 5,079 floats), never images."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return local
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local.arrays(), group=group)
    return Features.concat(Features(**p) for p in parts)
