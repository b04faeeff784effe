"""Evaluate samples the way DiT-family papers report them: ADM's FID, sFID, Inception Score, precision
and recall, in PyTorch (no TensorFlow).

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz [--inception-weights PATH]

Both files are ADM batches (.npz, arr_0 uint8 (N, H, W, 3); sample_ddp.py writes one). Prints the
metrics and writes them to <samples>.evaluation.json. A reference batch's own mu/sigma/mu_s/sigma_s are
used when it has them; each file's Inception features are cached beside it (or in --cache-dir), keyed by
its content, so the next sample batch against the same reference skips the reference's images.
"""
import sys

from dit_fast.cli import OneLineParser, run_entry
from dit_fast.evaluation.metrics import ARITHMETICS
from dit_fast.evaluation.suite import ADM_BATCH_SIZE


def parse_args(argv=None):
    parser = OneLineParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch", help="reference batch .npz (ADM's, or arr_0 images of your own)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 N x H x W x 3)")
    parser.add_argument("--inception-weights", default=None,
                        help="path of weights-inception-2015-12-05-6726825d.pth (default: torch hub's cache)")
    parser.add_argument("--batch-size", type=int, default=ADM_BATCH_SIZE, help="images per Inception batch")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    parser.add_argument("--cache-dir", default=None, help="folder for feature caches (default: beside each file)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write feature caches")
    parser.add_argument("--k", type=int, default=3, help="nearest neighbours for precision and recall")
    parser.add_argument("--split-size", type=int, default=5000, help="Inception Score split size")
    parser.add_argument("--distance-arithmetic", choices=ARITHMETICS, default="fp64",
                        help="precision/recall distances (adm-fp16 re-creates ADM's fp16 rounding)")
    parser.add_argument("--json", default=None, help="where to write the metrics (default: beside the samples)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.k < 1 or args.split_size < 1:
        parser.error("--batch-size, --k and --split-size must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dit_fast.evaluation import evaluate_npz
    return evaluate_npz(args.ref_batch, args.sample_batch, weights=args.inception_weights, device=args.device,
                        batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                        k=args.k, split_size=args.split_size, arithmetic=args.distance_arithmetic,
                        json_path=args.json)


def cli(argv=None) -> int:
    """Bad input: one line on stderr, exit code 2."""
    return run_entry(main, "evaluate.py", argv)


if __name__ == "__main__":
    sys.exit(cli())
