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

The process group comes from dit_fast.distributed (shared with sampling and extraction).
"""
from .loop import NonFiniteLossError, Position, TrainLoop, train
from .preempt import PREEMPTED_EXIT, Preempted

__all__ = ["PREEMPTED_EXIT", "Preempted", "NonFiniteLossError", "Position", "TrainLoop", "train"]
