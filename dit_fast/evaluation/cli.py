"""evaluate.py's command line: two ADM .npz batches -> the metrics (evaluate_npz), exit code 2 on bad
input. evaluate.py at the top of the repository only calls cli(); tests import this module.
"""
import sys

from dit_fast.cli import OneLineParser, run_entry

from .metrics import ARITHMETICS
from .suite import ADM_BATCH_SIZE

DESCRIPTION = ("Evaluate samples the way DiT-family papers report them: ADM's FID, sFID, Inception Score, "
               "precision and recall, in PyTorch (no TensorFlow).")


def parse_args(argv=None):
    parser = OneLineParser(prog="evaluate.py", description=DESCRIPTION)
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
    from .suite import evaluate_npz
    return evaluate_npz(args.ref_batch, args.sample_batch, weights=args.inception_weights, device=args.device,
                        batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                        k=args.k, split_size=args.split_size, arithmetic=args.distance_arithmetic,
                        json_path=args.json)


def cli(argv=None) -> int:
    """Bad input: one line on stderr, exit code 2."""
    return run_entry(main, "evaluate.py", argv)

