"""What an evaluation costs: Inception features per second, the Fréchet distances, precision/recall,
and from them an estimate for 50,000 samples (sampling itself is benchmarks/sampler_table.py's).

    python benchmarks/eval_cost.py [--device cuda] [--images 256] [--weights PATH]

Without --weights the 2015 Inception runs with random weights (same arithmetic, same time).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dit_fast.evaluation import FeatureExtractor, frechet_distance, precision_recall, statistics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="image side before the Inception's resize to 299")
    p.add_argument("--weights", default=None)
    args = p.parse_args()
    weights = args.weights
    if weights is None:
        from tests.evaluation_helpers import save_random_weights
        weights = save_random_weights(Path("/tmp/eval_cost_inception.pth"))
    extractor = FeatureExtractor(weights, device=args.device)
    images = torch.randint(0, 256, (args.batch_size, args.size, args.size, 3), dtype=torch.uint8)
    extractor(images[:2])  # warm-up (cuDNN's choice of kernels)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    started, done = time.perf_counter(), 0
    while done < args.images:
        features = extractor(images)
        done += len(images)
    sync()
    per_second = done / (time.perf_counter() - started)
    pool = np.random.default_rng(0).standard_normal((2 * 2048, 2048)).astype(np.float32)
    started = time.perf_counter()
    frechet_distance(*statistics(pool[:2048]), *statistics(pool[2048:]))
    frechet = time.perf_counter() - started
    started = time.perf_counter()
    precision_recall(pool[:2048], pool[2048:], device=args.device)
    manifold = time.perf_counter() - started
    print(f"device {args.device} ({torch.get_num_threads()} threads), {args.size}px -> 299: "
          f"Inception {per_second:.1f} img/s; one Fréchet distance (2048-d) {frechet:.1f} s; "
          f"precision/recall of 2048 vs 2048 {manifold:.1f} s; features of 50,000 samples ~ "
          f"{50_000 / per_second / 60:.1f} min (+ the reference's once, then cached) {features.pool.shape}")


if __name__ == "__main__":
    main()
