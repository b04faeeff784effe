"""ADM's evaluation suite (openai/guided-diffusion `evaluations/`) in PyTorch, without TensorFlow.

Metrics on features, for anyone to call:
    frechet_distance(mu1, sigma1, mu2, sigma2) -> float           # FID on pool_3, sFID on spatial
    inception_score(probs, split_size=5000) -> float              # mean over splits, as ADM reports
    precision_recall(ref_features, sample_features, k=3) -> (precision, recall)
Features and files:
    FeatureExtractor(weights=PATH)(images_uint8_nhwc) -> Features(pool, spatial, logits)
    evaluate_features(sample, ref) -> dict;  evaluate_npz(ref_npz, sample_npz) -> dict (+ JSON)
    gather_features(local) -> every rank's Features (for evaluation inside a distributed run)
"""
from .features import (WEIGHTS_NAME, WEIGHTS_URL, FeatureExtractor, Features, InceptionWeightsMissing,
                       default_weights_path)
from .manifold import precision_recall
from .metrics import frechet_distance, inception_score, statistics
from .suite import evaluate_features, evaluate_npz, format_metrics, gather_features

__all__ = ["frechet_distance", "inception_score", "precision_recall", "statistics", "FeatureExtractor",
           "Features", "InceptionWeightsMissing", "WEIGHTS_NAME", "WEIGHTS_URL", "default_weights_path",
           "evaluate_features", "evaluate_npz", "format_metrics", "gather_features"]
