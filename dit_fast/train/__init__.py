"""Training, one concern a module (no CLI parsing here: train.py builds the Config).

    loop.py      train(cfg) and TrainLoop: the optimizer-step loop, resume, save, the log line
    engine.py    the DeepSpeed config (ZeRO knobs from JSON + injected batch/precision/clipping),
                 model -> checkpointing -> compile -> optimizer -> engine
    step.py      the one training step (micro-step, optimizer step, EMA update): train.py and the table
    ema.py       the fp32 EMA of the fp32 master weights (every precision and ZeRO stage)
    data.py      the training data: checks before any step, resumable per-rank order, flips
    run_dir.py   run directories and their checkpoints (atomic, crash-safe publish, keep-last-K, RNG)
    resume.py    which checkpoint --resume auto / PATH continues (only the same experiment)
    metrics.py   the logger, loss statistics, metrics.jsonl / TensorBoard
    evaluate.py  --eval-every: ADM's metrics of EMA samples during training, RNG streams untouched
    save_io.py   checkpoint writes through our handle: the OS error kept, size + CRC-32 recorded
    integrity.py manifest.json and its check before a resume (verify.py: python -m dit_fast.train.verify)
    disk.py      will one checkpoint fit on --results-dir (checked before the first step)
    reshard.py   resume on another world size / ZeRO stage through DeepSpeed's universal checkpoint

The process group comes from dit_fast.distributed (shared with sampling and extraction); the
preemption stop (SIGTERM/SIGUSR1/SIGINT -> save, exit 75) from dit_fast.preempt (shared with sampling).
"""
from .loop import NonFiniteLossError, Position, TrainLoop, train
from ..preempt import PREEMPTED_EXIT, Preempted

__all__ = ["PREEMPTED_EXIT", "Preempted", "NonFiniteLossError", "Position", "TrainLoop", "train"]
