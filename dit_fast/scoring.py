"""Scoring generated digits with a classifier that never saw the DiT.

A small MLP (scikit-learn) is trained on a fixed split of the real digits at the demo's resolution.
It then (1) labels the generated samples: the share recognised as the class they were generated
for is the demo's accuracy, and (2) embeds real and generated digits with its hidden layer
(ReLU activations, 64 features): the Fréchet distance between the two Gaussians fitted there is
the demo's FID-like number, against the statistics of the classifier's training split. Reference
points are returned with it: the classifier's own held-out accuracy, and the Fréchet distance of as
many held-out real digits as there are samples (digits the reference statistics never saw).

    scorer = DigitScorer(image_size=8)
    metrics = scorer.score(samples_uint8_nhwc, labels)   # {"accuracy": ..., "frechet_distance": ...}
"""
from __future__ import annotations

import warnings

import numpy as np

from .data.digits import digits_dataset
from .evaluation import frechet_distance, statistics

HIDDEN = 64  # feature width of the Fréchet distance


def to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """Floats in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounding as sample_ddp.py does."""
    x = np.clip(np.asarray(images, dtype=np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def _flatten_uint8(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (N, H, W[, 1]) -> float32 (N, H*W) in [-1, 1]; the classifier's input."""
    x = np.asarray(images)
    if x.ndim == 4:
        if x.shape[-1] != 1:
            raise ValueError(f"expected grey images (N, H, W, 1), got shape {x.shape}")
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (image_size, image_size):
        raise ValueError(f"expected images of shape (N, {image_size}, {image_size}[, 1]), got {x.shape}; "
                         "score at the resolution the DiT was trained at")
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (0..255), got {x.dtype}; use to_uint8_nhwc")
    return x.reshape(len(x), -1).astype(np.float32) / 127.5 - 1.0


class DigitScorer:
    """An MLP classifier of the real digits at `image_size`, independent of any DiT.

    Trained on a fixed, stratified 75% split (random_state `seed`); `heldout_accuracy` is its
    accuracy on the other 25%. The real digits go through the same uint8 rounding as samples do.
    """

    def __init__(self, image_size: int = 8, seed: int = 0):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        self.image_size = image_size
        images, labels = digits_dataset(image_size)  # (N, 1, S, S) in [-1, 1]
        self.real = _flatten_uint8(to_uint8_nhwc(images), image_size)
        self.labels = labels
        self.train_idx, self.test_idx = train_test_split(
            np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=seed)
        self.clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), alpha=1e-3, max_iter=400, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf.fit(self.real[self.train_idx], labels[self.train_idx])
        self.heldout_accuracy = float(self.clf.score(self.real[self.test_idx], labels[self.test_idx]))

    def _heldout_subset(self, n: int) -> np.ndarray:
        """n held-out digits, stratified by class with a fixed seed (all of them if n is larger)."""
        if n >= len(self.test_idx):
            return self.test_idx
        from sklearn.model_selection import train_test_split
        labels = self.labels[self.test_idx]
        stratify = labels if n >= len(np.unique(labels)) else None  # one per class at least
        subset, _ = train_test_split(self.test_idx, train_size=n, stratify=stratify, random_state=0)
        return subset

    def features(self, x: np.ndarray) -> np.ndarray:
        """Hidden-layer ReLU activations (N, 64) of flattened inputs (N, S*S) in [-1, 1]."""
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class of each uint8 image (N, S, S[, 1])."""
        return self.clf.predict(_flatten_uint8(images, self.image_size))

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict:
        """Metrics of generated uint8 images (N, S, S[, 1]) generated for classes `labels` (N,).

        Returns accuracy (share predicted as their own class), per_class_accuracy, the Fréchet
        distance to the real training-split digits in the hidden-layer feature space, and for
        reference the classifier's held-out accuracy and the Fréchet distance of N real
        held-out-split digits (drawn stratified with a fixed seed) to the same training split.
        """
        labels = np.asarray(labels)
        x = _flatten_uint8(images, self.image_size)
        if labels.shape != (len(x),):
            raise ValueError(f"labels must have shape ({len(x)},), got {labels.shape}")
        pred = self.clf.predict(x)
        real_stats = statistics(self.features(self.real[self.train_idx]))
        fd = frechet_distance(*statistics(self.features(x)), *real_stats)
        ref = self._heldout_subset(len(x))
        fd_ref = frechet_distance(*statistics(self.features(self.real[ref])), *real_stats)
        per_class = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
        return {
            "accuracy": float((pred == labels).mean()),
            "per_class_accuracy": per_class,
            "frechet_distance": fd,
            "frechet_distance_real_subset": fd_ref,
            "frechet_features": f"hidden ReLU layer ({HIDDEN}) of the MLP classifier",
            "classifier": f"sklearn MLPClassifier({HIDDEN}), 75/25 stratified split of the real digits",
            "classifier_heldout_accuracy": self.heldout_accuracy,
            "num_samples": int(len(x)),
        }
