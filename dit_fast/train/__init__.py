"""Training, one concern a module (no CLI parsing here: train.py builds the Config).

    loop.py      train(cfg) and TrainLoop: the optimizer-step loop, resume, save, the log line
    engine.py    the DeepSpeed config (ZeRO knobs from JSON + injected batch/precision/clipping),
                 model -> checkpointing -> compile -> optimizer -> engine
    ema.py       the fp32 EMA of the weights (ZeRO-3 aware)
    data.py      the training data: checks before any step, resumable per-rank order, flips
    run_dir.py   run directories and their checkpoints (atomic, keep-last-K, resume lookup, RNG)
    metrics.py   the logger, loss statistics, metrics.jsonl / TensorBoard

The process group comes from dit_fast.distributed (shared with sampling and extraction).
"""
from .loop import NonFiniteLossError, Position, TrainLoop, train

__all__ = ["NonFiniteLossError", "Position", "TrainLoop", "train"]
