"""fp64 vs fp32 vs ADM's fp16 distances: precision/recall on pool_3-like features (N each, D = 2048):
non-negative features on a 64-dim latent manifold plus noise, squared norms ~10^3 like pool_3's.

    python benchmarks/eval_distances.py 5000     # the README's numbers (~3 min on one CPU core)
"""
import sys
import time

import numpy as np

from dit_fast.evaluation import precision_recall

n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
rng = np.random.default_rng(0)
W = rng.standard_normal((64, 2048)) / 8


def feats(shift):
    z = rng.standard_normal((n, 64)) + shift
    return np.log1p(np.exp(z @ W - 0.5)).astype(np.float32) + rng.gamma(0.5, 0.1, (n, 2048)).astype(np.float32)


ref = feats(0.0)
print("median squared norm", float(np.median((ref.astype(np.float64) ** 2).sum(1))))
for shift in (0.0, 0.1, 0.3):
    sample = feats(shift)
    for a in ("fp64", "fp32", "adm-fp16"):
        t = time.perf_counter(); p, r = precision_recall(ref, sample, arithmetic=a, device="cpu")
        print(f"shift {shift} {a:8s}: P={p:.5f} R={r:.5f}  ({time.perf_counter() - t:.1f} s)", flush=True)
