"""Evaluate samples the way DiT-family papers report them: ADM's FID, sFID, Inception Score, precision
and recall, in PyTorch (no TensorFlow).

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz [--inception-weights PATH]

Both files are ADM batches (.npz, arr_0 uint8 (N, H, W, 3); sample_ddp.py writes one). Prints the
metrics and writes them to <samples>.evaluation.json. A reference batch's own mu/sigma/mu_s/sigma_s are
used when it has them; each file's Inception features are cached beside it (or in --cache-dir), keyed by
its content, so the next sample batch against the same reference skips the reference's images.
"""
import sys

from dit_fast.evaluation.cli import cli

sys.exit(cli())  # a script, run only: the library is dit_fast.evaluation.cli (import that, never this file)
