"""Training run directories: ``results/NNN-<model>/`` (DiT's naming) and the checkpoints in them --
atomic step directories, keep-last-K, resume lookup, RNG capture. (Loading and saving model
weights by themselves is dit_fast.checkpoint.)

A run directory holds config.json, log.txt, metrics.jsonl and ``checkpoints/``. Layout of one checkpoint (``<run>/checkpoints/step-0000100/``)::

    ds/                       DeepSpeed's engine.save_checkpoint (module, ZeRO optimizer shards)
    train_state.pt            rank 0: step, data position (epoch, step_in_epoch), world size,
                              resolved config (plain dict), fp16 skipped-step count
    ema-0000100.pt            rank 0: {"ema": fp32 state dict of the DiT}; loads with DiT's sample.py
                              and dit_fast.checkpoint.load_state_dict. A wrapped model (REPA: the
                              DiT + its projector) keeps the wrapper's other EMA weights beside it,
                              {"ema": DiT keys, "ema_extra": {"projectors.0.0.weight": ...}}
    rng-rank00000.pt ...      one per global rank: torch / cuda / numpy / python RNG states

All ranks write into ``step-0000100.tmp/``; after a barrier rank 0 renames it to ``step-0000100/``.
A kill mid-save therefore leaves only a ``.tmp`` dir, which resume ignores and the next save
removes. Replacing an existing step dir moves it to ``.old`` first; resume puts a lone ``.old``
back (run_dir.recover_checkpoints), so the previous complete checkpoint survives every crash.
Before the rename every file and directory of the ``.tmp`` dir is fsynced (DeepSpeed does not). Our files load with ``torch.load(weights_only=True)``; ``ds/`` is read by DeepSpeed.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import fsync_dir, fsync_tree
from ..checkpoint.run_files import TRAIN_STATE, ema_file_name, list_checkpoints, step_dir_name
from ..checkpoint.safe_io import safe_torch_load
from ..config import Config
from ..distributed import broadcast_from_rank0
from ..faults import maybe_fault
from .integrity import write_manifest
from .save_io import CheckpointWriteError, SaveRecorder, failure_line

DS_TAG = "ds"
FORMAT_VERSION = 1


def make_run_dir(cfg: Config, rank: int, resume_from: Path | None) -> Path:
    """results/NNN-<model> (DiT's naming), or the run that holds the resumed checkpoint.

    Collective. Rank 0 creates it; if that fails (a file where the folder should be, no
    permission) every rank raises the same error instead of waiting in the broadcast.
    """
    def create() -> str:
        if resume_from is not None:
            return str(resume_from.parent.parent)
        root = Path(cfg.train.results_dir)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"--results-dir {str(root)!r} is a file, not a directory")
        root.mkdir(parents=True, exist_ok=True)
        index = len(list(root.glob("*")))
        run_dir = root / f"{index:03d}-{cfg.model.model.replace('/', '-')}"
        run_dir.mkdir(parents=True, exist_ok=False)
        return str(run_dir)

    return Path(broadcast_from_rank0(create, rank))


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


# ---------------------------------------------------------------- RNG states (plain tensors only)

def capture_rng() -> dict:
    """This process's RNG states as tensors/ints, so the file loads with weights_only=True."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # CPU runs never touch CUDA
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- save / load

def save_training_checkpoint(engine, ema_state: dict | None, train_state: dict, run_dir: Path,
                             step: int, rank: int, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint dir.

    Every file goes through save_io (OS errors kept, size and CRC-32 recorded for manifest.json). A
    write that fails on any rank (disk full, file-size limit, quota) fails the save on every rank
    with CheckpointWriteError naming it; the .tmp dir is removed and the previous checkpoint stays.
    """
    root = run_dir / "checkpoints"
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + ".tmp")
    recorder = SaveRecorder(tmp)
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # a stale half-written save of this very step
                shutil.rmtree(tmp)
            (tmp / DS_TAG).mkdir(parents=True)  # so DeepSpeed's own makedirs cannot fail
        except OSError as err:
            recorder.fail(tmp, err)
    status = [recorder.failure]
    dist.broadcast_object_list(status, src=0)  # also the barrier: the .tmp dir exists
    _raise_if_failed({0: status[0]} if status[0] else {}, rank, tmp, final)
    _engine_save(engine, recorder, tmp)
    maybe_fault("save.after_engine", step)
    recorder.save(capture_rng(), tmp / rng_file_name(rank))
    maybe_fault("save.after_rng", step)
    if rank == 0:
        recorder.save(ema_file_payload(ema_state), tmp / ema_file_name(step))
        maybe_fault("save.after_ema", step)
        recorder.save({**train_state, "version": FORMAT_VERSION}, tmp / TRAIN_STATE)
        maybe_fault("save.after_state", step)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (recorder.files, recorder.failure))  # also the barrier
    _raise_if_failed({r: f for r, (_, f) in enumerate(reports) if f}, rank, tmp, final)
    if rank == 0:
        try:
            write_manifest(tmp, {k: v for files, _ in reports for k, v in files.items()})
            # DeepSpeed's files are written without fsync: make every byte durable before the
            # rename publishes them (one file system walk; each rank's shards are in place by now).
            fsync_tree(tmp)
            maybe_fault("save.before_publish", step)
            _publish(tmp, final, step)
        except OSError as err:
            recorder.fail(tmp, err)
    status = [recorder.failure]
    dist.broadcast_object_list(status, src=0)
    _raise_if_failed({0: status[0]} if status[0] else {}, rank, tmp, final)
    if rank == 0:
        maybe_fault("save.before_prune", step)
        prune_checkpoints(root, keep_last)
    dist.barrier()
    return final


def _engine_save(engine, recorder: SaveRecorder, tmp: Path) -> None:
    """DeepSpeed's save with its writes recorded. Its only other writes (rank 0 copies the
    zero_to_fp32.py script) come after all its collectives but its last barrier: a failure there
    joins that barrier here, so no rank waits."""
    with recorder.on_engine(engine):
        try:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        except OSError as err:
            recorder.fail(tmp, err)
            dist.barrier()


def _raise_if_failed(failures: dict, rank: int, tmp: Path, final: Path) -> None:
    if not failures:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    done = list_checkpoints(final.parent)
    raise CheckpointWriteError(failure_line(failures, rank, final, done[-1][1] if done else None))


def _publish(tmp: Path, final: Path, step: int) -> None:
    """Rename tmp -> final. An existing final (a re-run from an older checkpoint) is first moved to
    final.old, removed only once the new one is in place; a crash between the two renames leaves
    final.old, which recover_checkpoints renames back."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        fsync_dir(final.parent)
        maybe_fault("publish.between_renames", step)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoints(root: Path) -> None:
    """Undo an interrupted publish in one run's checkpoints/ dir: a step-N.old whose step-N is
    missing is the last complete copy of step N and goes back in place. (A .tmp is never
    trusted: some rank may not have finished its shards.)"""
    if not root.is_dir():
        return
    for old in root.glob("step-*.old"):
        final = old.with_name(old.name[:-len(".old")])
        if not final.exists() and old.is_dir() and (old / TRAIN_STATE).is_file():
            os.rename(old, final)
            fsync_dir(root)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and every stale .tmp/.old
    (after recover_checkpoints has put back any .old that is still the only copy)."""
    recover_checkpoints(root)
    complete = list_checkpoints(root)
    if keep_last > 0:
        for _, path in complete[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.is_dir() and (path.name.endswith(".tmp") or path.name.endswith(".old")):
            shutil.rmtree(path, ignore_errors=True)


# Model fields that must match to resume; speed switches (attention backend, fused adaLN,
# checkpointing fraction) may change between runs.
_SHAPE_FIELDS = ("model", "depth", "hidden_size", "num_heads", "in_channels", "input_size",
                 "num_classes", "learn_sigma", "class_dropout_prob")


def check_same_model(saved: dict, current: dict, ckpt: Path) -> None:
    """Raise ValueError listing every model field where the checkpoint and the flags differ."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in _SHAPE_FIELDS if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {ckpt}: the model differs ({'; '.join(diffs)}); "
                         "use the original run's model flags or start a new run")


def load_training_checkpoint(engine, ckpt: Path, rank: int, world_size: int,
                             model_config: dict, load_dir: Path | None = None) -> tuple[dict, dict | None]:
    """Collective: restore engine (module + optimizer) and this rank's RNG. ``load_dir``: where
    DeepSpeed reads the engine state (the universal form after a world-size change; reshard.py).

    Returns (train_state, ema_state); ema_state is None on ranks other than 0.
    """
    state = safe_torch_load(ckpt / TRAIN_STATE)
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{ckpt}: checkpoint format {state.get('version')} is not "
                         f"{FORMAT_VERSION}; it was written by another dit_fast version")
    check_same_model(state["config"]["model"], model_config, ckpt)
    load_path, _ = engine.load_checkpoint(str(load_dir or ckpt), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no engine state under {ckpt / DS_TAG}")
    rng_file = ckpt / rng_file_name(rank)
    # Exact continuation needs the same ranks; with another world size the caller warns and the
    # per-rank seeds set at start stay in effect.
    if state["world_size"] == world_size and rng_file.is_file():
        restore_rng(safe_torch_load(rng_file))
    ema = ema_state_of(safe_torch_load(ckpt / ema_file_name(state["step"]))) if rank == 0 else None
    return state, ema


_WRAPPED = "dit."  # a wrapper's DiT (REPAModel.dit): its keys are the DiT's own under this prefix


def ema_file_payload(ema_state: dict | None) -> dict:
    """What the EMA file holds: {"ema": the DiT's state dict} and, for a wrapped model, "ema_extra"
    with the wrapper's other weights, so the file samples as a plain DiT/SiT (DiT's sample.py reads
    checkpoint["ema"]) while resume still restores the whole EMA."""
    if ema_state is None or not any(k.startswith(_WRAPPED) for k in ema_state):
        return {"ema": ema_state}
    dit = {k[len(_WRAPPED):]: v for k, v in ema_state.items() if k.startswith(_WRAPPED)}
    extra = {k: v for k, v in ema_state.items() if not k.startswith(_WRAPPED)}
    return {"ema": dit, "ema_extra": extra}


def ema_state_of(payload: dict) -> dict:
    """The inverse of ema_file_payload: the EMA model's whole state dict."""
    if "ema_extra" not in payload:
        return payload["ema"]
    return {**{_WRAPPED + k: v for k, v in payload["ema"].items()}, **payload["ema_extra"]}
