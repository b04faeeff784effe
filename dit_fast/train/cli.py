"""train.py's command line: its flags (DiT / fast-DiT names) -> Config -> dit_fast.train.train, and
the exit codes (0 done, 2 bad input, 1 the run failed, 75 stopped by a signal after a checkpoint). train.py at the top of the repository only
calls cli(); tests and tools import this module, never the script.
"""
import argparse
import sys

from dit_fast.cli import OneLineParser, one_line, run_entry
from dit_fast.config import (PRECISIONS, REPA_WEIGHTINGS, add_model_flags, add_transport_flags, checkpointing_arg,
                             config_from_args)

DESCRIPTION = "Train a DiT under DeepSpeed (ZeRO 0-3, bf16/fp16/fp32, EMA, exact resume)."
EXIT_CODES = ("exit codes: 0 done; 1 the run failed (non-finite loss, a stuck or dead rank, a "
              "checkpoint that could not be written); 2 bad input; 75 stopped by SIGTERM / SIGUSR1 / "
              "SIGINT after saving a complete checkpoint (requeue and rerun with --resume auto)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train.py", description=DESCRIPTION, epilog=EXIT_CODES,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_flags(p, show_size_overrides=False, model_choices=False)  # --model, --image-size, --num-classes, backends
    a = p.add_argument
    # DiT / fast-DiT flags (same names and defaults)
    a("--data-path", type=str, default=None, help="ImageFolder tree; VAE-encoded on the fly")
    a("--features-path", type=str, default=None, help="latents from extract_features.py")
    a("--results-dir", type=str, default="results")
    a("--global-batch-size", type=int, default=256)
    a("--global-seed", type=int, default=0)
    a("--epochs", type=int, default=1400)
    a("--log-every", type=int, default=100)
    a("--ckpt-every", type=int, default=50_000)
    a("--vae", type=str, default="ema", help="ema | mse | local dir | repo id | none (pixels)")
    a("--num-workers", type=int, default=4)
    # DeepSpeed and speed
    a("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", type=str, default=None,
      help="ZeRO-knobs JSON (configs/deepspeed/zero{1,2,3}.json, zero2_offload.json); "
           "default: ZeRO stage 0")
    a("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
      help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK env is what counts
    a("--precision", choices=PRECISIONS, default="bf16")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--grad-clip", type=float, default=0.0, help="max gradient norm; 0 = off (DiT)")
    a("--lr", type=float, default=1e-4)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-checkpointing", type=checkpointing_arg, nargs="?", const=1.0, default=0.0,
      metavar="FRACTION|selective",
      help="recompute activations of this fraction of blocks (flag alone = all); selective: every "
           "block, keeping each fc2 output")
    a("--compile", action="store_true", help="torch.compile each block")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--resume", type=str, default=None, metavar="PATH|auto",
      help="a checkpoints/step-NNNNNNN dir, or auto: newest under --results-dir")
    a("--init-from", type=str, default=None, metavar="PATH|OFFICIAL_NAME",
      help="start a new run from these weights (EMA/.pt/.safetensors file, run or step dir, diffusers "
           "folder, DiT-XL-2-256x256.pt): fresh optimizer, step 0; other --num-classes/--image-size allowed")
    a("--keep-labels", action="store_true",
      help="with --init-from and another --num-classes: keep the label rows of the classes both have")
    a("--keep-last", type=int, default=2, help="checkpoints kept (0 = all)")
    a("--ignore-disk-check", action="store_true",
      help="start even if the --results-dir filesystem cannot hold one checkpoint (estimated)")
    a("--ema-decay", type=float, default=0.9999)
    a("--collective-timeout", type=float, default=600.0, metavar="SECONDS",
      help="a collective or DataLoader worker waiting longer fails the job, naming step and rank")
    add_transport_flags(p, defaults=True)  # --objective flow and SiT's --path-type --prediction --loss-weight ...
    add_repa_flags(p)  # --repa --enc-type --encoder --encoder-depth --proj-coeff --projector-dim --weighting
    add_evaluation_flags(p)
    # small models for tests and ablations: override the named size
    return p


def add_repa_flags(parser: argparse.ArgumentParser) -> None:
    """--repa and REPA's training flags, with REPA's names (--path-type is shared with SiT's)."""
    a = parser.add_argument
    a("--repa", dest="objective", action="store_const", const="repa",
      help="REPA: SiT's velocity loss in REPA's time plus the alignment with a frozen encoder "
           "(= --objective repa); needs images beside the latents (extract_features.py --keep-images)")
    a("--enc-type", type=str, default=None, help="repa: dinov2-vit-b (default) | dinov2reg-vit-b | ...")
    a("--encoder", type=str, default=None, metavar="PATH_OR_ID",
      help="repa: the encoder's save_pretrained folder or hub id (default facebook/dinov2-<size>)")
    a("--encoder-depth", type=int, default=None, help="repa: the aligned block (default 8)")
    a("--proj-coeff", type=float, default=None, help="repa: alignment loss weight (default 0.5)")
    a("--projector-dim", type=int, default=None, help="repa: projector hidden width (default 2048)")
    a("--weighting", type=str, default=None, metavar="|".join(REPA_WEIGHTINGS),
      help="repa: t ~ uniform (default) or lognormal")


def add_evaluation_flags(p) -> None:
    """Evaluation during training (dit_fast/train/evaluate.py), off unless --eval-every is given."""
    a = p.add_argument
    a("--eval-every", type=int, default=0, metavar="STEPS",
      help="ADM's FID (sFID, IS, precision, recall) of EMA samples every STEPS steps; 0 = off")
    a("--eval-samples", type=int, default=1000, help="samples per evaluation, over all ranks")
    a("--eval-ref", type=str, default=None, metavar="REF_BATCH.npz", help="reference batch (ADM's or your own)")
    a("--inception-weights", type=str, default=None, metavar="PATH",
      help="weights-inception-2015-12-05-6726825d.pth (default: torch hub's cache)")
    a("--eval-sampler", type=str, default=None,
      help="diffusion: ddpm|ddim|dpm-solver++ (default)|unipc|euler|heun; flow: euler|heun (default)|midpoint|sde; "
           "repa: euler|heun (default)|sde")
    a("--eval-steps", type=int, default=25, help="sampling steps per evaluation sample")
    a("--eval-cfg-scale", type=float, default=1.0, help="guidance scale of the evaluation samples")
    a("--eval-batch-size", type=int, default=32, help="samples per rank per batch")


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 bad input (one line, nothing created); 1 the run failed (a
    non-finite loss on any rank, a collective that timed out, a checkpoint that could not be
    written), one line naming step and rank; 75 (PREEMPTED_EXIT) a signal stopped it after a complete
    checkpoint: rerun with --resume auto."""
    return run_entry(_main, "train.py", argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from dit_fast.distributed import CollectiveTimeout, env_world
    from . import PREEMPTED_EXIT, NonFiniteLossError, Preempted, train
    from .save_io import CheckpointWriteError
    cfg = config_from_args(args)
    try:
        train(cfg)
        _shutdown()
    except CheckpointWriteError as err:  # an OSError, but no bad input: the run failed
        _say(f"train.py: error: rank {env_world()[0]}: {one_line(err)}")
        return 1
    except Preempted as err:
        _say(f"train.py: {one_line(err)}")
        _shutdown()
        return PREEMPTED_EXIT
    except (NonFiniteLossError, CollectiveTimeout) as err:
        print(f"train.py: error: {one_line(err)}", file=sys.stderr)
        return 1
    except dist.DistError as err:  # any other collective (a save's barrier) timed out or lost a peer
        print(f"train.py: error: rank {env_world()[0]}: a collective failed (a peer stuck past "
              f"--collective-timeout {cfg.train.collective_timeout:g} s, or dead): {one_line(err)}",
              file=sys.stderr)
        return 1
    return 0


def _say(line: str) -> None:
    # One write per line: every rank prints its own, and two ranks' halves must not interleave.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _shutdown() -> None:
    # Leaving the process group explicitly lets the ranks exit at once instead of in gloo's teardown.
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cli(argv=None) -> None:
    """train.py's entry point: exit with main's code (a failed run's through exit_leaving_group)."""
    from dit_fast.distributed import exit_leaving_group
    exit_leaving_group(main(argv))
