"""Sample many images from a DiT on one or more processes and pack them for FID (the original's flags).

    torchrun --nproc_per_node 8 sample_ddp.py --num-fid-samples 50000           # official DiT-XL/2
    python sample_ddp.py --model DiT-S/2 --ckpt ckpt.pt --vae none --image-size 32 --num-fid-samples 1000

Writes {index:06d}.png into <sample-dir>/<model>-<ckpt>-size-<size>-vae-<vae>-cfg-<cfg>-seed-<seed>
(the original's folder), then rank 0 writes <folder>.npz with ``arr_0`` (N, H, W, 3) uint8 for the ADM
evaluation suite, exactly --num-fid-samples images. Runs under torchrun (NCCL on GPUs, Gloo on CPU) or as
a plain single process.

Resuming: rerun the same command after a crash or a stop; SIGTERM / SIGUSR1 / SIGINT let each process
finish the batch in flight (every PNG is written atomically), skip the .npz and exit 75, like train.py;
batches whose PNGs all exist are skipped. To make a
resumed run give the same images as an uninterrupted one, every batch draws its noise and labels from
its own generator seeded by (global seed, rank, batch index). This differs from the original, which
seeds each rank once (global_seed * world_size + rank) and draws all batches from that stream, so the
images are statistically equivalent but not the original's pixels (sample.py does match them).
"""
import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dit_fast.atomic import atomic_write_text
from dit_fast.cli import OneLineParser
from dit_fast.config import SampleConfig
from dit_fast.diffusion import create_diffusion
from dit_fast.distributed import init_distributed
from dit_fast.sample_cli import (add_common_flags, build_sampling_model, check_official_defaults,
                                 check_sampling_inputs, format_sample_config, model_input_size,
                                 resolve_device, run_cli)
from dit_fast.sample_files import save_png, to_uint8_hwc, write_npz_from_pngs
from dit_fast.sampling import Sampler, decode
from dit_fast.vae import is_pixel_space, load_vae


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sample_ddp.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, cfg_default=1.5)
    parser.add_argument("--vae", type=str, default="ema", help="ema | mse | a local diffusers dir | none")
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--fid-ref", type=str, default=None,
                        help="reference statistics .npz (mu, sigma): report FID when pytorch-fid and its "
                             "Inception weights are available locally")
    return parser


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def folder_name(cfg) -> str:
    """The original's folder name (a --vae directory or 'none' enters by its base name)."""
    model = cfg.model.replace("/", "-")
    ckpt = os.path.basename(cfg.ckpt).replace(".pt", "") if cfg.ckpt else "pretrained"
    vae = os.path.basename(os.path.normpath(cfg.vae))
    return f"{model}-{ckpt}-size-{cfg.image_size}-vae-{vae}-cfg-{cfg.cfg_scale}-seed-{cfg.global_seed}"


def resolve_checkpoint_path(spec: str) -> Path:
    """The file (or folder) --ckpt names; official names resolve to the cached download."""
    from dit_fast.checkpoint import OFFICIAL_CHECKPOINTS, download_official
    path = Path(spec).expanduser()
    if spec in OFFICIAL_CHECKPOINTS and not path.exists():
        return download_official(spec)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt {spec!r} does not exist")
    return path


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


# Every flag that changes the pixels of a batch (the checkpoint enters by its identity).
_IMAGE_FLAGS = ("model", "image_size", "num_classes", "cfg_scale", "num_sampling_steps", "sampler",
                "vae", "in_channels", "depth", "hidden_size", "num_heads", "guide_all_channels",
                "precision", "attn_backend", "fused_adaln", "tf32", "compile", "compile_mode",
                "global_seed", "per_proc_batch_size")


def sample_settings(cfg, ckpt_path: Path, world_size: int, device) -> dict:
    """What a folder's PNGs depend on: recorded in sample_ddp.json, compared on every rerun."""
    settings = {k: getattr(cfg, k) for k in _IMAGE_FLAGS}
    vae = Path(str(cfg.vae)).expanduser()
    settings.update(world_size=world_size, device=torch.device(device).type, seeding="per-batch-v2",
                    checkpoint=file_identity(ckpt_path),
                    vae=file_identity(vae) if vae.is_dir() else cfg.vae)
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


def main(argv=None) -> dict:
    """Run sample_ddp.py with `argv`; returns {"folder", "npz" (rank 0), "fid"}."""
    cfg = SampleConfig.from_args(build_parser().parse_args(argv))
    if cfg.cfg_scale < 1.0:
        raise ValueError(f"--cfg-scale must be >= 1.0 (1.0 disables guidance), got {cfg.cfg_scale}")
    if cfg.global_seed < 0:
        raise ValueError(f"--global-seed must be >= 0, got {cfg.global_seed}")
    if cfg.per_proc_batch_size < 1 or cfg.num_fid_samples < 1:
        raise ValueError("--per-proc-batch-size and --num-fid-samples must be >= 1")
    if is_pixel_space(cfg.vae) and cfg.in_channels != 3:
        raise ValueError(f"the .npz for the ADM evaluation suite needs RGB images; --in-channels is {cfg.in_channels}")
    input_size = model_input_size(cfg.model, cfg.image_size, cfg.vae)
    if cfg.ckpt is None:
        check_official_defaults(cfg.model, cfg.image_size, cfg.num_classes, cfg.vae)
    check_sampling_inputs(cfg)
    if Path(cfg.sample_dir).exists() and not Path(cfg.sample_dir).is_dir():
        raise NotADirectoryError(f"--sample-dir {cfg.sample_dir!r} is a file; give a directory")
    if cfg.fid_ref and not Path(cfg.fid_ref).is_file():
        raise FileNotFoundError(f"--fid-ref {cfg.fid_ref!r} does not exist (a .npz with mu and sigma)")
    ctx = init_distributed(cfg.device)  # a process group only under torchrun (NCCL / Gloo)
    device = resolve_device(str(ctx.device), cfg.tf32)
    try:
        with torch.no_grad():
            return _sample_all(cfg, input_size, ctx.rank, ctx.world_size, device)
    finally:
        ctx.close()


def _sample_all(cfg, input_size: int, rank: int, world_size: int, device) -> dict:
    torch.manual_seed(cfg.global_seed * world_size + rank)  # the original's seed (model init only here)
    if rank == 0:
        print(format_sample_config(cfg))
    print(f"Starting rank={rank}, world_size={world_size}, device={device}.")
    in_channels = cfg.in_channels if is_pixel_space(cfg.vae) else 4
    ckpt_path = resolve_checkpoint_path(cfg.ckpt or f"DiT-XL-2-{cfg.image_size}x{cfg.image_size}.pt")
    model = build_sampling_model(cfg.model, input_size, cfg.num_classes, in_channels,
                                 str(ckpt_path), device, cfg.attn_backend, cfg.fused_adaln, depth=cfg.depth,
                                 hidden_size=cfg.hidden_size, num_heads=cfg.num_heads)
    vae = load_vae(cfg.vae, device=device)
    using_cfg = cfg.cfg_scale > 1.0
    sampler = Sampler(model, create_diffusion(str(cfg.num_sampling_steps)), cfg_scale=cfg.cfg_scale,
                      num_classes=cfg.num_classes, use_cfg=using_cfg, sampler=cfg.sampler,
                      precision=cfg.precision, guide_all_channels=cfg.guide_all_channels)

    folder = Path(cfg.sample_dir) / folder_name(cfg)
    n = cfg.per_proc_batch_size
    check_resume_settings(folder, sample_settings(cfg, ckpt_path, world_size, device), rank,
                          world_size)
    if rank == 0:
        print(f"Saving .png samples at {folder}")
    barrier(world_size)

    global_batch = n * world_size
    total = int(math.ceil(cfg.num_fid_samples / global_batch) * global_batch)
    iterations = total // global_batch
    todo = [b for b in range(iterations)
            if not all((folder / f"{i:06d}.png").is_file() for i in batch_indices(b, n, rank, world_size))]
    if rank == 0:
        print(f"Total number of images that will be sampled: {total}"
              + (f" ({iterations - len(todo)} of {iterations} batches per rank already done: resuming)"
                 if len(todo) < iterations else ""))
    if cfg.compile and todo:
        seconds = sampler.compile((n, model.in_channels, input_size, input_size), mode=cfg.compile_mode)
        if rank == 0:
            print(f"Compiled the sampling step in {seconds:.1f} s.")
    _run_batches(cfg, sampler, vae, folder, todo, iterations, rank, world_size, device,
                 (n, model.in_channels, input_size, input_size))

    barrier(world_size)  # all PNGs are on disk before the .npz is built
    result = {"folder": folder, "npz": None, "fid": None}
    if rank == 0:
        npz = write_npz_from_pngs(folder, cfg.num_fid_samples)
        print(f"Saved .npz file to {npz} [shape=({cfg.num_fid_samples}, {cfg.image_size}, "
              f"{cfg.image_size}, 3)].")
        result["npz"] = npz
        if cfg.fid_ref:
            from dit_fast.fid import fid_from_npz
            result["fid"] = fid_from_npz(npz, cfg.fid_ref, device=device)
        print("Done.")
    barrier(world_size)
    return result


def _run_batches(cfg, sampler, vae, folder, todo, iterations, rank, world_size, device, shape) -> None:
    from tqdm import tqdm

    from dit_fast.train.preempt import Preempted, PreemptionFlag
    stop = PreemptionFlag().install()  # a signal ends the loop between batches, never mid-file
    bar = tqdm(total=iterations, initial=iterations - len(todo), disable=rank != 0, desc="batches")
    try:
        _sample_batches(cfg, sampler, vae, folder, todo, rank, world_size, device, shape, bar, stop)
    finally:
        stop.uninstall()
        bar.close()
    if stop.signal_name:
        raise Preempted(f"rank {rank} stopped by {stop.signal_name} between batches; the PNGs "
                        f"written are complete, no .npz yet: rerun the same command to finish {folder}")


def _sample_batches(cfg, sampler, vae, folder, todo, rank, world_size, device, shape, bar, stop):
    for b in todo:
        if stop.signal_name:
            return
        g = torch.Generator(device).manual_seed(batch_seed(cfg.global_seed, rank, b))
        z = torch.randn(shape, generator=g, device=device)
        y = torch.randint(0, cfg.num_classes, (shape[0],), generator=g, device=device)
        images = to_uint8_hwc(decode(sampler.sample(z, y, generator=g), vae))
        for index, image in zip(batch_indices(b, shape[0], rank, world_size), images):
            save_png(image, folder / f"{index:06d}.png")
        bar.update(1)


def cli(argv=None) -> None:
    """Entry point: library errors (bad flags, missing checkpoint or VAE) become one clear line;
    a stop on a signal is one line and exit 75 (rerun to finish)."""
    import sys

    from dit_fast.train.preempt import PREEMPTED_EXIT, Preempted
    try:
        run_cli(main, "sample_ddp.py", argv)
    except Preempted as err:
        print(f"sample_ddp.py: {err}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":
    cli()
