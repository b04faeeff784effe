"""Resume on another number of ranks: DeepSpeed's universal checkpoint, converted once, automatically.

A ZeRO checkpoint holds one optimizer partition per data-parallel rank, so DeepSpeed refuses to load
it on another world size. Its own converter (``deepspeed.checkpoint.ds_to_universal``) rewrites the
partitions as one file per parameter (fp32 master, exp_avg, exp_avg_sq), which any world size
loads with ``"checkpoint": {"load_universal": true}`` in the DeepSpeed config. We convert into
``<checkpoint>/universal/`` (a ``.tmp`` dir renamed when complete, so an interrupted conversion is
simply redone) and keep it beside the original, which stays untouched and verified by its manifest.

What changes with the world size: the per-rank micro batch (global batch = micro x accumulation x
world stays, and a global batch the new world does not divide is refused before anything starts);
the per-rank RNG streams (each rank keeps its fresh seed global_seed * world + rank, so the run
continues statistically, not bit-exactly). The global sample order is the same: optimizer step k
draws the same items for any world size (data.ShardOrder).
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..atomic import fsync_dir, fsync_tree
from ..checkpoint.run_files import TRAIN_STATE
from .run_dir import DS_TAG

UNIVERSAL = "universal"


def saved_layout(ckpt: Path) -> tuple[int, int | None, dict]:
    """(world size, ZeRO stage or None if not recorded, train config dict) of the checkpoint."""
    from ..checkpoint import safe_torch_load
    state = safe_torch_load(ckpt / TRAIN_STATE)
    return int(state["world_size"]), state.get("zero_stage"), state["config"].get("train", {})


def universal_root(ckpt: Path) -> Path:
    """The load_dir DeepSpeed reads the universal form from (tag DS_TAG below it)."""
    return ckpt / UNIVERSAL


def ensure_universal(ckpt: Path, log) -> Path:
    """Convert ``ckpt``'s DeepSpeed files to the universal form unless done before; rank 0 only.
    Returns the load_dir for engine.load_checkpoint(load_dir, tag=DS_TAG)."""
    root = universal_root(ckpt)
    if (root / DS_TAG / "zero").is_dir():
        log(f"Using the universal checkpoint converted before: {root}")
        return root
    tmp = ckpt / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"Converting {ckpt / DS_TAG} to DeepSpeed's universal checkpoint in {root} "
        "(once; deepspeed.checkpoint.ds_to_universal)")
    from deepspeed.checkpoint import ds_to_universal
    args = argparse.Namespace(input_folder=str(ckpt / DS_TAG), output_folder=str(tmp / DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    fsync_tree(tmp)
    os.rename(tmp, root)
    fsync_dir(ckpt)
    return root


def reshard_note(saved: int, world: int, saved_train: dict, micro: int, accum: int) -> str:
    """The log line of a world-size change: what stays and what changes."""
    if saved == world:
        return f"Resuming on the same {world} rank(s) through the universal form (another ZeRO stage)"
    return (f"Resuming a {saved}-rank checkpoint on {world} rank(s): global batch "
            f"{saved_train.get('global_batch_size')} unchanged; micro batch per rank "
            f"{saved_train.get('micro_batch_size')} -> {micro}, gradient accumulation "
            f"{saved_train.get('grad_accum')} -> {accum}; per-rank RNG streams start afresh "
            "(continues, not bit-exactly)")


def engine_load_dir(ckpt: Path, world: int, rank: int, ds_config: dict, log) -> Path:
    """Collective. Where engine.load_checkpoint reads ``ckpt``'s engine state on ``world`` ranks:
    the checkpoint itself, or (ZeRO partitions written by another world size) its universal form,
    converted by rank 0 if needed, with ``ds_config`` switched to load it."""
    from ..distributed import broadcast_from_rank0
    saved, saved_stage, saved_train = saved_layout(ckpt)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    partitioned = any((ckpt / DS_TAG).glob("*zero_pp_rank_*_optim_states.pt"))
    other_stage = saved_stage is not None and saved_stage != stage
    if not partitioned or (saved == world and not other_stage):
        return ckpt
    if stage == 3 or saved_stage == 3:
        raise ValueError(f"cannot resume {ckpt} (ZeRO-{saved_stage}, {saved} ranks) under ZeRO-{stage} "
                         f"on {world} ranks: with ZeRO-3 on either side only the same world size and "
                         "stage load (DeepSpeed 0.19.8's universal load into ZeRO-3 expects per-rank "
                         "model files its converter does not write); use the original layout")
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    if rank == 0:
        log(reshard_note(saved, world, saved_train, ds_config["train_micro_batch_size_per_gpu"],
                         ds_config["gradient_accumulation_steps"]))
        if other_stage:
            log(f"The checkpoint was written under ZeRO-{saved_stage}, this run uses ZeRO-{stage}")
    return Path(broadcast_from_rank0(lambda: str(ensure_universal(ckpt, log)), rank))
