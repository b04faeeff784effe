"""Many images over ranks, resumable (sample_ddp.py): every batch draws from its own seed, a rerun
skips the batches whose PNGs exist, and a folder records what its images depend on so a rerun with
other settings or another checkpoint is refused instead of mixing two sets of images.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dit_fast.atomic import atomic_write_text
from dit_fast.faults import maybe_fault
from dit_fast.preempt import Preempted, PreemptionFlag

from .build import decode
from .images import save_png, to_uint8_hwc


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def folder_name(cfg) -> str:
    """The original's folder name (a --vae directory or 'none' enters by its base name)."""
    model = cfg.model.model.replace("/", "-")
    ckpt = os.path.basename(os.path.normpath(cfg.ckpt)).replace(".pt", "") if cfg.ckpt else "pretrained"
    vae = os.path.basename(os.path.normpath(cfg.vae))
    return f"{model}-{ckpt}-size-{cfg.model.image_size}-vae-{vae}-cfg-{cfg.cfg_scale}-seed-{cfg.global_seed}"


def batch_seed(global_seed: int, rank: int, batch: int) -> int:
    """A 64-bit seed for one batch of one rank, independent of every other batch (resume = same images)."""
    return int(np.random.SeedSequence([global_seed, rank, batch]).generate_state(1, np.uint64)[0])


def batch_indices(batch: int, n: int, rank: int, world_size: int) -> list:
    """File indices of one batch: the original's interleaving i * world_size + rank + batch * G."""
    return [i * world_size + rank + batch * n * world_size for i in range(n)]


_HEAD_BYTES = 1 << 20  # hash the first MiB: tells two checkpoints apart without reading 2.7 GB


def file_identity(path: Path) -> dict:
    """Path, size, mtime and the sha256 of the first MiB of a file (each file of a folder)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = {"path": str(path.resolve()), "files": []}
    for f in files:
        with open(f, "rb") as handle:
            head = hashlib.sha256(handle.read(_HEAD_BYTES)).hexdigest()
        st = f.stat()
        out["files"].append({"name": str(f.relative_to(path)) if path.is_dir() else f.name,
                             "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head})
    return out


# Every setting that changes the pixels of a batch (the checkpoint enters by its identity).
_IMAGE_SETTINGS = ("cfg_scale", "num_sampling_steps", "sampler", "guide_all_channels", "precision",
                   "tf32", "compile", "compile_mode", "global_seed", "per_proc_batch_size")
_FLOW_SETTINGS = ("objective", "mode", "sampling_method", "atol", "rtol", "reverse", "diffusion_form",
                  "diffusion_norm", "last_step", "last_step_size")
_MODEL_SETTINGS = ("model", "image_size", "num_classes", "in_channels", "depth", "hidden_size",
                   "num_heads", "learn_sigma", "attn_backend", "adaln_backend")


def sample_settings(cfg, weights: Path, world_size: int, device) -> dict:
    """What a folder's PNGs depend on: recorded in sample_ddp.json, compared on every rerun."""
    settings = {k: getattr(cfg, k) for k in _IMAGE_SETTINGS}
    settings.update({k: getattr(cfg.model, k) for k in _MODEL_SETTINGS})
    # Recorded only when used, so folders sampled before these options existed still resume.
    if cfg.cfg_interval is not None:
        settings["cfg_interval"] = list(cfg.cfg_interval)
    if cfg.objective == "flow":
        settings.update({k: getattr(cfg, k) for k in _FLOW_SETTINGS}, transport=cfg.transport.__dict__)
    if cfg.objective == "repa":
        settings.update(objective="repa", mode=cfg.mode, heun=cfg.heun, repa_path_type=cfg.repa_path_type)
    vae = Path(str(cfg.vae)).expanduser()
    settings.update(world_size=world_size, device=torch.device(device).type, seeding="per-batch-v2",
                    diffusion=json.loads(json.dumps(cfg.diffusion.__dict__)),
                    checkpoint=file_identity(Path(weights)),
                    vae=file_identity(vae) if vae.is_dir() else cfg.vae)
    if cfg.latent_norm is not None:  # only when recorded: folders sampled before keep their settings
        settings.update(latent_norm=cfg.latent_norm)
    return settings


def check_resume_settings(folder: Path, settings: dict, rank: int, world_size: int) -> None:
    """Refuse to continue a folder sampled with other settings or another checkpoint (a rerun
    skips every batch whose PNGs exist, so it would mix two sets of images)."""
    meta = folder / "sample_ddp.json"
    previous = json.loads(meta.read_text()) if meta.is_file() else None
    if previous is None and folder.is_dir() and any(folder.glob("*.png")):
        previous = {"settings": "unknown: PNGs without a sample_ddp.json"}
    barrier(world_size)  # everyone has read it before rank 0 (re)writes it
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from the file
    if previous is not None and previous != settings:
        diff = "; ".join(f"{k}: before {previous.get(k)!r}, now {settings.get(k)!r}"
                         for k in sorted(set(previous) | set(settings)) if previous.get(k) != settings.get(k))
        raise ValueError(f"{folder} holds samples made with other settings ({diff}); use the same "
                         "flags, checkpoint and number of processes to resume, or another --sample-dir")
    if rank == 0 and previous is None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta, json.dumps(settings, indent=1))


def batches_to_do(folder: Path, iterations: int, n: int, rank: int, world_size: int) -> list:
    """This rank's batch numbers whose PNGs are not all on disk yet."""
    return [b for b in range(iterations)
            if not all((folder / f"{i:06d}.png").is_file() for i in batch_indices(b, n, rank, world_size))]


def run_batches(sampler, vae, folder: Path, todo: list, iterations: int, *, global_seed: int,
                num_classes: int, rank: int, world_size: int, device, shape) -> None:
    """Sample the batches ``todo`` of shape ``shape`` (n, C, H, W) and write their PNGs. SIGTERM /
    SIGUSR1 / SIGINT end the loop between batches (never mid-file) with Preempted: rerun to finish.

    The ranks agree before every batch (one all-reduce of one int, on a CPU gloo group under NCCL:
    the preemption flag of training), so a signal to any rank stops them all after the same round
    and every rank exits 75 -- a signalled rank no longer leaves its peers to sample on and then
    fail at the barrier it never reaches. A rank with fewer batches left (a resumed set) takes part
    in the rounds it has nothing to do in."""
    from tqdm import tqdm
    stop = PreemptionFlag().install()
    bar = tqdm(total=iterations, initial=iterations - len(todo), disable=rank != 0, desc="batches")
    try:
        stop.join_group(world_size)
        for round_ in range(stop.max_over_ranks(len(todo), world_size)):
            if stop.agreed(world_size):
                break
            if round_ >= len(todo):
                continue
            b = todo[round_]
            g = torch.Generator(device).manual_seed(batch_seed(global_seed, rank, b))
            z = torch.randn(shape, generator=g, device=device)
            y = torch.randint(0, num_classes, (shape[0],), generator=g, device=device)
            images = to_uint8_hwc(decode(sampler.sample(z, y, generator=g), vae))
            for index, image in zip(batch_indices(b, shape[0], rank, world_size), images):
                save_png(image, folder / f"{index:06d}.png")
            bar.update(1)
            maybe_fault("sample.batch", b)
        stopped = stop.agreed(world_size)  # a signal during the last batch stops every rank too
    finally:
        stop.uninstall()
        bar.close()
    if stopped:
        who = stop.signal_name or "a signal to another rank"
        raise Preempted(f"rank {rank} stopped by {who} between batches; the PNGs "
                        f"written are complete, no .npz yet: rerun the same command to finish {folder}")
