"""extract_features.py's command line: flags -> ExtractConfig -> extract_features, exit codes 0 / 2.
extract_features.py at the top of the repository only calls cli(); tests import this module.
"""
import argparse
import sys

from dit_fast.cli import OneLineParser, run_entry

from ..latent_norm import LATENT_NORMS
from .extract import ExtractConfig, extract_features

DESCRIPTION = "Pre-extract VAE latents (or pixels) of an ImageFolder tree into packed, resumable shards."


def parse_args(argv=None) -> ExtractConfig:
    p = OneLineParser(prog="extract_features.py", description=DESCRIPTION)
    p.add_argument("--data-path", required=True, help="ImageFolder root (one folder per class)")
    p.add_argument("--features-path", required=True, help="output directory (rerun to resume)")
    p.add_argument("--image-size", type=int, default=256, help="center-crop side in pixels")
    p.add_argument("--vae", default="ema",
                   help="ema | mse | local AutoencoderKL dir | repo id | none (pixel space)")
    p.add_argument("--global-seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("--batch-size", type=int, default=32, help="images per encode, per rank")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding workers per rank")
    p.add_argument("--grayscale", action="store_true", help="one channel (only with --vae none)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage dtype (fast-DiT stored float32)")
    p.add_argument("--latent-norm", choices=LATENT_NORMS, default="config",
                   help="config: store latents normalised with the VAE config's scaling_factor / "
                        "shift_factor (SD: x 0.18215); channel: store raw latents and record their "
                        "per-channel mean and std in index.json (applied in training and sampling)")
    p.add_argument("--keep-images", action="store_true",
                   help="also store each cropped uint8 image beside its latents (REPA's encoder input)")
    # The deepspeed launcher appends --local_rank=N; the env (LOCAL_RANK) carries the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    del args.local_rank
    return ExtractConfig(**{k: v for k, v in vars(args).items()})


def main(argv=None) -> int:
    """0 done; 2 bad input: one line on stderr, nothing created (dit_fast.cli)."""
    return run_entry(lambda a: extract_features(parse_args(a)), "extract_features.py", argv)



def cli(argv=None) -> None:
    """extract_features.py's entry point: exit with main's code."""
    sys.exit(main(argv))
