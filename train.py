"""Train a DiT under DeepSpeed (ZeRO 0-3, bf16/fp16/fp32, EMA, exact resume).

    deepspeed train.py --deepspeed_config configs/deepspeed/zero2.json --model DiT-XL/2 \\
        --features-path /data/in1k-latents
    torchrun --nproc_per_node 8 train.py ...       # also works; so does plain `python train.py ...`

Many nodes (passwordless ssh; --results-dir and the data on a filesystem all nodes share, since
every rank writes its shard of each checkpoint into the same directory):

    $ cat hostfile
    node1 slots=8
    node2 slots=8
    deepspeed --hostfile hostfile --master_addr node1 train.py \
        --deepspeed_config configs/deepspeed/zero2.json --model DiT-XL/2 \
        --features-path /shared/in1k-latents --results-dir /shared/results --global-batch-size 256

Flags keep DiT / fast-DiT names; batch size, accumulation, precision and clipping are injected into
the DeepSpeed JSON (which holds ZeRO knobs only). See dit_fast/train/ for the semantics.
"""
import argparse
import sys

from dit_fast.cli import OneLineParser, one_line, run_entry
from dit_fast.config import PRECISIONS, checkpointing_arg, config_from_args


EXIT_CODES = ("exit codes: 0 done; 1 the run failed (non-finite loss, a stuck or dead rank, a "
              "checkpoint that could not be written); 2 bad input; 75 stopped by SIGTERM / SIGUSR1 / "
              "SIGINT after saving a complete checkpoint (requeue and rerun with --resume auto)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0], epilog=EXIT_CODES,
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # DiT / fast-DiT flags (same names and defaults)
    a("--model", type=str, default="DiT-XL/2", help="name in dit_fast.models.DiT_models")
    a("--image-size", type=int, default=256)
    a("--num-classes", type=int, default=1000)
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
    a("--attn-backend", type=str, default="sdpa")
    a("--fused-adaln", action="store_true", help="fused Triton adaLN kernels")
    a("--compile", action="store_true", help="torch.compile each block")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--resume", type=str, default=None, metavar="PATH|auto",
      help="a checkpoints/step-NNNNNNN dir, or auto: newest under --results-dir")
    a("--keep-last", type=int, default=2, help="checkpoints kept (0 = all)")
    a("--ignore-disk-check", action="store_true",
      help="start even if the --results-dir filesystem cannot hold one checkpoint (estimated)")
    a("--ema-decay", type=float, default=0.9999)
    a("--collective-timeout", type=float, default=600.0, metavar="SECONDS",
      help="a collective or DataLoader worker waiting longer fails the job, naming step and rank")
    # small models for tests and ablations: override the named size
    a("--depth", type=int, default=None, help=argparse.SUPPRESS)
    a("--hidden-size", type=int, default=None, help=argparse.SUPPRESS)
    a("--num-heads", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 bad input (one line, nothing created); 1 the run failed (a
    non-finite loss on any rank, a collective that timed out), one line naming step and rank;
    75 (PREEMPTED_EXIT) a signal stopped it after a complete checkpoint: rerun with --resume auto."""
    return run_entry(_main, "train.py", argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from dit_fast.distributed import CollectiveTimeout, env_world
    from dit_fast.train import PREEMPTED_EXIT, NonFiniteLossError, Preempted, train
    from dit_fast.train.save_io import CheckpointWriteError
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


if __name__ == "__main__":
    sys.exit(main())
