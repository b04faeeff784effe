"""sample_ddp.py: many images on one or more processes, packed for FID (the original's flags).

Writes {index:06d}.png into <sample-dir>/<model>-<ckpt>-size-<size>-vae-<vae>-cfg-<cfg>-seed-<seed>
(the original's folder), then rank 0 writes <folder>.npz with ``arr_0`` (N, H, W, 3) uint8 for the
ADM evaluation suite, exactly --num-fid-samples images; with --evaluate REF_BATCH rank 0 then writes
<folder>.evaluation.json (dit_fast.evaluation, the code evaluate.py runs). Resuming and seeding:
dit_fast.sampling.resumable.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from dit_fast.checkpoint import official_checkpoint_name
from dit_fast.cli import OneLineParser
from dit_fast.distributed import init_distributed
from dit_fast.preempt import PREEMPTED_EXIT, Preempted
from dit_fast.vae import is_pixel_space

from .flags import (add_common_flags, build_sampling_model, format_sample_config, load_sampling_vae,
                    resolve_device, resolve_sample_config, run_cli, sampler_of)
from .images import write_npz_from_pngs
from .resumable import (barrier, batches_to_do, check_resume_settings, folder_name, run_batches,
                        sample_settings)


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sample_ddp.py", description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser, cfg_default=1.5, vae_default="ema")
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--evaluate", "--fid-ref", dest="evaluate", type=str, default=None, metavar="REF_BATCH",
                        help="reference batch .npz (ADM's, or arr_0 images; mu/sigma alone give FID only): "
                             "after the .npz, ADM's FID, sFID, IS, precision and recall (evaluate.py's "
                             "code) go to <folder>.evaluation.json. --fid-ref is its old name")
    parser.add_argument("--inception-weights", type=str, default=None, metavar="PATH",
                        help="with --evaluate: weights-inception-2015-12-05-6726825d.pth (default: torch "
                             "hub's cache); checked before sampling starts")
    return parser


def _check(cfg) -> None:
    if cfg.cfg_scale < 1.0:
        raise ValueError(f"--cfg-scale must be >= 1.0 (1.0 disables guidance), got {cfg.cfg_scale}")
    if cfg.global_seed < 0:
        raise ValueError(f"--global-seed must be >= 0, got {cfg.global_seed}")
    if cfg.per_proc_batch_size < 1 or cfg.num_fid_samples < 1:
        raise ValueError("--per-proc-batch-size and --num-fid-samples must be >= 1")
    if is_pixel_space(cfg.vae) and cfg.model.in_channels != 3:
        raise ValueError("the .npz for the ADM evaluation suite needs RGB images; --in-channels is "
                         f"{cfg.model.in_channels}")
    if Path(cfg.sample_dir).exists() and not Path(cfg.sample_dir).is_dir():
        raise NotADirectoryError(f"--sample-dir {cfg.sample_dir!r} is a file; give a directory")
    if cfg.evaluate:
        _check_evaluation(cfg)
    elif cfg.inception_weights:
        raise ValueError("--inception-weights is an option of --evaluate REF_BATCH")


def _check_evaluation(cfg) -> None:
    """--evaluate's reference, the sample count and the Inception weights, before anything is sampled."""
    from dit_fast.evaluation.suite import check_reference
    check_reference(cfg.evaluate, cfg.inception_weights, "--evaluate", cfg.num_fid_samples)


def main(argv=None) -> dict:
    """Run sample_ddp.py with ``argv``; returns {"folder", "npz", "metrics", "fid"} (the last three on rank 0;
    metrics and fid with --evaluate)."""
    args = build_parser().parse_args(argv)
    cfg, source = resolve_sample_config(args)
    _check(cfg)
    # A bad --device or backend: one line before sample_ddp.json or a PNG exists (a rerun would be refused).
    device = resolve_device(cfg.device, cfg.tf32, cfg.model)
    ctx = init_distributed(str(device))  # a process group only under torchrun (NCCL / Gloo)
    device = ctx.device  # cuda:LOCAL_RANK
    try:
        with torch.set_grad_enabled(False):
            return _sample_all(cfg, source, ctx.rank, ctx.world_size, device)
    finally:
        ctx.close()


def _weights_path(cfg, source) -> Path:
    """The file (or folder) to load; the official checkpoint resolves to its cached download."""
    if source is not None:
        return source.weights
    from .run_source import resolve_ckpt
    return resolve_ckpt(official_checkpoint_name(cfg.model.image_size)).weights


def _sample_all(cfg, source, rank: int, world_size: int, device) -> dict:
    torch.manual_seed(cfg.global_seed * world_size + rank)  # the original's seed (model init only here)
    main_rank = rank == 0  # prints, writes sample_ddp.json and the .npz
    if main_rank:
        print(format_sample_config(cfg))
    print(f"Starting rank={rank}, world_size={world_size}, device={device}.")
    weights = _weights_path(cfg, source)
    m = cfg.model
    model = build_sampling_model(m, weights, device, saved=bool(source and source.config))
    vae = load_sampling_vae(cfg, device)
    sampler = sampler_of(cfg, model, use_cfg=cfg.cfg_scale > 1.0)

    folder = Path(cfg.sample_dir) / folder_name(cfg)
    n = cfg.per_proc_batch_size
    check_resume_settings(folder, sample_settings(cfg, weights, world_size, device), rank, world_size)
    if main_rank:
        print(f"Saving .png samples at {folder}")
    barrier(world_size)

    global_batch = n * world_size
    total = int(math.ceil(cfg.num_fid_samples / global_batch) * global_batch)
    iterations = total // global_batch
    todo = batches_to_do(folder, iterations, n, rank, world_size)
    if main_rank:
        print(f"Total number of images that will be sampled: {total}"
              + (f" ({iterations - len(todo)} of {iterations} batches per rank already done: resuming)"
                 if len(todo) < iterations else ""))
    shape = (n, model.in_channels, m.input_size, m.input_size)
    if cfg.compile and todo:
        seconds = sampler.compile(shape, mode=cfg.compile_mode)
        if main_rank:
            print(f"Compiled the sampling step in {seconds:.1f} s.")
    run_batches(sampler, vae, folder, todo, iterations, global_seed=cfg.global_seed,
                num_classes=m.num_classes, rank=rank, world_size=world_size, device=device, shape=shape)

    barrier(world_size)  # all PNGs are on disk before the .npz is built
    result = {"folder": folder, "npz": None, "fid": None, "metrics": None}
    if main_rank:
        npz = write_npz_from_pngs(folder, cfg.num_fid_samples)
        print(f"Saved .npz file to {npz} [shape=({cfg.num_fid_samples}, {m.image_size}, {m.image_size}, 3)].")
        result["npz"] = npz
    barrier(world_size)  # the other ranks are done; only rank 0 evaluates (no collective waits on it)
    if main_rank and cfg.evaluate:
        from dit_fast.evaluation import evaluate_npz
        result["metrics"] = evaluate_npz(cfg.evaluate, npz, weights=cfg.inception_weights, device=device)
        result["fid"] = result["metrics"]["fid"]
    if main_rank:
        print(f"Done: {cfg.num_fid_samples} samples.")
    return result


def cli(argv=None) -> None:
    """Entry point: library errors (bad flags, missing checkpoint or VAE) become one clear line;
    a stop on a signal is one line and exit 75 (PREEMPTED_EXIT: rerun to finish)."""
    try:
        run_cli(main, "sample_ddp.py", argv)
    except Preempted as err:
        print(f"sample_ddp.py: {err}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
