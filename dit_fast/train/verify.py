"""Check a run's checkpoints against their manifests without training.

    python -m dit_fast.train.verify results/000-DiT-XL-2                          # every checkpoint
    python -m dit_fast.train.verify results/000-DiT-XL-2/checkpoints/step-0050000 # one

One line per checkpoint (``ok``, ``DAMAGED`` with the first problem, or ``unverified`` for a
checkpoint written before manifests existed); exit 0 when none is damaged, 1 otherwise, 2 when the
path is neither a run nor a checkpoint. ``--sizes-only`` skips reading the bytes (seconds for any size).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint.run_files import STEP_DIR, TRAIN_STATE, list_checkpoints
from ..cli import OneLineParser, run_entry
from .integrity import manifest_bytes, verify_checkpoint


def checkpoints_of(path: Path) -> list[Path]:
    """The checkpoint dirs a path names: itself, a run's checkpoints/, or that dir's contents."""
    if STEP_DIR.match(path.name) and (path / TRAIN_STATE).is_file():
        return [path]
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return [p for _, p in found]
    raise FileNotFoundError(f"{str(path)!r} is neither a run directory with checkpoints/ nor a "
                            "complete checkpoint (step-NNNNNNN/ with train_state.pt)")


def main(argv=None) -> int:
    """Verify; returns 0 (all intact or unverifiable) or 1 (some checkpoint damaged)."""
    p = OneLineParser(prog="python -m dit_fast.train.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a run directory or one checkpoints/step-NNNNNNN directory")
    p.add_argument("--sizes-only", action="store_true", help="check sizes, not checksums")
    args = p.parse_args(argv)
    damaged = 0
    for ckpt in checkpoints_of(Path(args.path)):
        problems, note = verify_checkpoint(ckpt, checksums=not args.sizes_only)
        if problems:
            damaged += 1
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            print(f"DAMAGED {ckpt}: {problems[0]}{more}")
        elif note:
            print(f"unverified {ckpt}: no manifest (written before checksums existed)")
        else:
            print(f"ok {ckpt} ({manifest_bytes(ckpt) / 1e6:.1f} MB)")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(run_entry(main, "python -m dit_fast.train.verify"))
