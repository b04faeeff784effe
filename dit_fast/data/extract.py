"""Feature pre-extraction: ImageFolder -> ADM crop -> VAE encode (image and its flip) -> shards.

Runs as one process or under torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK).
Shards are fixed ranges of the sorted image list; the unfinished ones are dealt to ranks
round-robin. Each shard is written atomically, so a rerun with the same arguments skips finished
shards and a crash loses at most the shards in flight. Rank 0 writes index.json after a barrier.
The features directory must be on a filesystem every rank sees.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..distributed import init_distributed
from ..latent_norm import SD_LATENT_SCALE, LatentNorm, channel_stats, check_latent_norm_mode
from ..vae import is_pixel_space
from .image_folder import ImageFolder, pixels_to_tensor
from .latents import (STORAGE_DTYPES, finish_shard, open_shard_writer, read_shard_meta,
                      shard_name, write_index)


@dataclasses.dataclass
class ExtractConfig:
    """Settings of one extraction run (the flags of extract_features.py)."""

    data_path: str
    """ImageFolder root: one sub-folder per class."""
    features_path: str
    """Output directory (created; rerunning into it resumes)."""
    image_size: int = 256
    """Side of the ADM center crop, in pixels."""
    vae: str = "ema"
    """ema | mse | a local diffusers AutoencoderKL directory | a repo id | none (pixel space)."""
    global_seed: int = 0
    """Seeds the posterior samples, per (shard, batch), so reruns are reproducible."""
    batch_size: int = 32
    """Images per encode call (each call also encodes their flips: 2x this)."""
    shard_size: int = 4096
    """Images per shard file."""
    num_workers: int = 4
    """DataLoader workers decoding and cropping images, per rank."""
    grayscale: bool = False
    """Pixel space only: store one grey channel instead of RGB."""
    dtype: str = "float32"
    """Storage dtype: float32 (as fast-DiT) or float16 (half the disk)."""
    keep_images: bool = False
    """Also store each cropped uint8 image (C, S, S) beside its latents, the input of REPA's encoder
    (its flip is the mirror, made on read): 3 * S * S bytes an image, 192 KiB at 256 px."""
    latent_norm: str = "config"
    """config: store (latent - shift_factor) * scaling_factor of the VAE's config (SD: * 0.18215);
    channel: store the raw latents and measure their per-channel mean and std (fp64 sums over every
    stored latent, both flips) into index.json; training and sampling apply them (dit_fast.latent_norm)."""

    def validate(self) -> None:
        check_latent_norm_mode(self.latent_norm)
        if self.latent_norm == "channel" and is_pixel_space(self.vae):
            raise ValueError("--latent-norm channel normalises autoencoder latents; it needs a --vae "
                             "(pixel space is already in [-1, 1])")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"--dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.grayscale and not is_pixel_space(self.vae):
            raise ValueError("--grayscale is for pixel space only: add --vae none (the SD VAEs "
                             "take RGB)")
        for name in ("image_size", "batch_size", "shard_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.global_seed < 0:
            raise ValueError(f"--global-seed must be >= 0, got {self.global_seed}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")


def shard_fingerprint(cfg: ExtractConfig, folder: ImageFolder, shard: int) -> dict:
    """What a finished shard must match to be reused: settings and its exact file list."""
    start = shard * cfg.shard_size
    items = folder.samples[start : start + cfg.shard_size]
    h = hashlib.sha256()
    for path, label in items:
        h.update(f"{os.path.relpath(path, folder.root)}\t{label}\n".encode())
    settings = {"image_size": cfg.image_size, "vae": cfg.vae, "grayscale": cfg.grayscale,
                "dtype": cfg.dtype, "shard_size": cfg.shard_size}
    if not is_pixel_space(cfg.vae):  # the posterior noise depends on these; pixels don't
        settings.update(global_seed=cfg.global_seed, batch_size=cfg.batch_size)
    if cfg.keep_images:  # only when set: shards extracted before the flag existed still match
        settings.update(keep_images=True)
    if cfg.latent_norm == "channel":  # raw latents, not config-scaled ones (same rule as above)
        settings.update(latent_norm="channel")
    elif not is_pixel_space(cfg.vae) and _config_norm(cfg) != _SD_NORM:
        settings.update(latent_norm=_config_norm(cfg))  # shards of older code used SD's 0.18215
    return {"settings": settings, "files_sha256": h.hexdigest(), "num_files": len(items)}


def find_pending(cfg: ExtractConfig, folder: ImageFolder, num_shards: int) -> tuple[list, dict]:
    """Split shards into pending and finished; a finished shard from other settings is an error.

    Every rank checks every shard, so all ranks agree and fail together (no hang at a barrier).
    """
    pending, done = [], {}
    for s in range(num_shards):
        meta = read_shard_meta(cfg.features_path, s)
        if meta is None:
            pending.append(s)
            continue
        want = shard_fingerprint(cfg, folder, s)
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise ValueError(
                f"{cfg.features_path!r} already holds {shard_name(s)} from a different "
                f"extraction (stored {got}, now {want}). Use a new --features-path, or delete "
                "the old shards to start over.")
        done[s] = meta
    return pending, done


def posterior_seed(global_seed: int, shard: int, batch: int) -> int:
    """A 63-bit seed for one (shard, batch): independent streams, same on every rerun/world size."""
    a, b = np.random.SeedSequence([global_seed, shard, batch]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


def encode_pair(pixels: torch.Tensor, vae, device: torch.device, seed: int) -> torch.Tensor:
    """uint8 (B, S, S, C) -> (B, 2, C', h, w): the encoding of each image and of its flip."""
    x = pixels_to_tensor(pixels.numpy()).to(device)  # (B, C, S, S) in [-1, 1]
    both = torch.cat([x, x.flip(-1)])  # (2B, C, S, S)
    if vae is None:
        z = both
    elif "generator" in inspect.signature(vae.encode).parameters:
        z = vae.encode(both, generator=torch.Generator(device).manual_seed(seed))
    else:
        # The wrapper samples from the global RNG: seed a forked copy so the caller's is untouched.
        forked = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            z = vae.encode(both)
    B = x.shape[0]
    return torch.stack([z[:B], z[B:]], dim=1)  # (B, 2, C', h, w)


class RawLatents:
    """A VAE seen through its un-normalised encoder (``encode`` = ``VAE.encode_raw``): what
    --latent-norm channel stores, the statistics being measured on exactly these values."""

    def __init__(self, vae):
        self.encode = vae.encode_raw


class _ShardItems(torch.utils.data.Dataset):
    """Cropped uint8 pixels per index; an unreadable file becomes an error string, not a crash."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        try:
            return i, torch.from_numpy(self.folder.load_pixels(i)), None
        except Exception as err:  # any decoder failure: report it by path and move on
            return i, None, str(err)


def _collate(items):
    good = [(i, px) for i, px, _ in items if px is not None]
    bad = [(i, err) for i, px, err in items if px is None]
    pixels = torch.stack([px for _, px in good]) if good else None  # (B, S, S, C) uint8
    return [i for i, _ in good], pixels, bad


def _batches(cfg: ExtractConfig, n: int, shards: list[int]) -> list[tuple[int, int, list[int]]]:
    out = []
    for s in shards:
        stop = min((s + 1) * cfg.shard_size, n)
        for b, start in enumerate(range(s * cfg.shard_size, stop, cfg.batch_size)):
            out.append((s, b, list(range(start, min(start + cfg.batch_size, stop)))))
    return out


def _open_images(cfg: ExtractConfig) -> ImageFolder:
    """The ImageFolder of --data-path, after the checks a bad command line fails on."""
    from ..vae import check_vae_spec, vae_downsample
    data, out = Path(cfg.data_path), Path(cfg.features_path)
    if not data.exists():
        raise FileNotFoundError(f"--data-path {cfg.data_path!r} does not exist")
    if not data.is_dir():
        raise NotADirectoryError(f"--data-path {cfg.data_path!r} is a file, not a directory of "
                                 "class folders")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--features-path {cfg.features_path!r} is a file; give a directory")
    check_vae_spec(cfg.vae)
    if cfg.image_size % vae_downsample(cfg.vae):
        raise ValueError(f"--image-size {cfg.image_size} must be divisible by the VAE's "
                         f"downsampling factor {vae_downsample(cfg.vae)}")
    folder = ImageFolder(cfg.data_path, cfg.image_size, random_flip=False, grayscale=cfg.grayscale)
    if len(folder) == 0:
        raise ValueError(f"--data-path {cfg.data_path!r} holds no images")
    return folder


def _load_vae(cfg: ExtractConfig, device: torch.device):
    """(encoder or None, latent_shape) for the configured --vae: the VAE, or its raw view with
    --latent-norm channel."""
    channels = 1 if cfg.grayscale else 3
    if is_pixel_space(cfg.vae):
        return None, (channels, cfg.image_size, cfg.image_size)
    from dit_fast.vae import load_vae  # diffusers is only needed with a VAE

    vae = load_vae(cfg.vae, device=device, dtype=torch.float32)
    if cfg.image_size % vae.downsample:
        raise ValueError(f"--image-size {cfg.image_size} must be divisible by the VAE's "
                         f"downsampling factor {vae.downsample}")
    size = cfg.image_size // vae.downsample
    encoder = RawLatents(vae) if cfg.latent_norm == "channel" else vae
    return encoder, (vae.latent_channels, size, size)


def _channel_sums(stored: np.ndarray) -> dict:
    """fp64 per-channel sum and sum of squares of stored (B, 2, C, h, w) latents (both flips, in
    the storage dtype: the statistics are of what training reads)."""
    x = stored.astype(np.float64)
    return {"sum": x.sum(axis=(0, 1, 3, 4)).tolist(), "sum_sq": (x * x).sum(axis=(0, 1, 3, 4)).tolist(),
            "count": int(x.size // x.shape[2])}


def _add_sums(total: dict | None, part: dict) -> dict:
    if total is None:
        return part
    return {"sum": [a + b for a, b in zip(total["sum"], part["sum"])],
            "sum_sq": [a + b for a, b in zip(total["sum_sq"], part["sum_sq"])],
            "count": total["count"] + part["count"]}


_SD_NORM = LatentNorm("config", scale=SD_LATENT_SCALE).to_dict()


def _config_norm(cfg: ExtractConfig) -> dict:
    """The --vae config's scaling_factor / shift_factor as a LatentNorm record (read from disk)."""
    from ..vae import vae_config
    return LatentNorm.from_vae_config(vae_config(cfg.vae) or {}).to_dict()


def _index_latent_norm(cfg: ExtractConfig, metas: list[dict], channels: int) -> dict | None:
    """The index's latent_norm: the VAE config's numbers, or the per-channel statistics summed
    over the shards' fp64 partial sums in shard order (the same numbers for any world size and
    any number of resumes: each finished shard carries its sums in its meta.json)."""
    if is_pixel_space(cfg.vae):
        return None
    if cfg.latent_norm == "config":
        return _config_norm(cfg)
    total = None
    for s, meta in enumerate(metas):
        part = meta.get("latent_sums")
        if part is None and meta["count"]:
            raise RuntimeError(f"{shard_name(s)} has no per-channel sums (extracted without "
                               "--latent-norm channel?); delete its files and rerun")
        if part is not None:
            total = _add_sums(total, part)
    zero = [0.0] * channels
    total = total or {"sum": zero, "sum_sq": zero, "count": 0}
    return channel_stats(total["sum"], total["sum_sq"], total["count"]).to_dict()


@torch.inference_mode()
def _run_shards(cfg, folder, shards, vae, latent_shape, ctx) -> None:
    """Encode and write the given shards of this rank, one finished shard at a time."""
    batches = _batches(cfg, len(folder), shards)
    loader = torch.utils.data.DataLoader(
        _ShardItems(folder), batch_sampler=[idx for _, _, idx in batches],
        num_workers=cfg.num_workers, collate_fn=_collate,
        pin_memory=ctx.device.type == "cuda")
    total = sum(len(idx) for _, _, idx in batches)
    bar = tqdm(total=total, unit="img", disable=ctx.rank != 0, dynamic_ncols=True,
               desc=f"extract rank 0/{ctx.world_size}")
    state = None  # (shard, writer, labels, skipped, rows written)
    sums = None  # --latent-norm channel: this shard's fp64 per-channel sums so far
    for (shard, b, idx), (good, pixels, bad) in zip(batches, loader):
        if state is None or state[0] != shard:
            for stale in Path(cfg.features_path).glob(f".{shard_name(shard)}.*"):
                stale.unlink(missing_ok=True)  # left by a killed run
            cap = len(folder.samples[shard * cfg.shard_size : (shard + 1) * cfg.shard_size])
            buf = open_shard_writer(cfg.features_path, shard, cap, (2, *latent_shape), cfg.dtype)
            images = _open_image_writer(cfg, shard, cap, folder)
            state, sums = (shard, (buf, images), [], [], 0), None
        _, (buf, images), labels, skipped, row = state
        for i, err in bad:
            path = folder.samples[i][0]
            tqdm.write(f"[rank {ctx.rank}] skipping unreadable image {path}: {err}",
                       file=sys.stderr)
            skipped.append([path, err])
        if good:
            z = encode_pair(pixels, vae, ctx.device, posterior_seed(cfg.global_seed, shard, b))
            if tuple(z.shape[2:]) != latent_shape:
                raise RuntimeError(f"encoder returned {tuple(z.shape[2:])}, "
                                   f"expected {latent_shape}")
            stored = z.float().cpu().numpy().astype(cfg.dtype)
            buf[row : row + len(good)] = stored
            if cfg.latent_norm == "channel":
                sums = _add_sums(sums, _channel_sums(stored))
            if images is not None:
                images[row : row + len(good)] = pixels.permute(0, 3, 1, 2).numpy()  # (B, C, S, S)
            labels.extend(folder.samples[i][1] for i in good)
            row += len(good)
        state = (shard, (buf, images), labels, skipped, row)
        bar.update(len(idx))
        if idx[-1] + 1 == min((shard + 1) * cfg.shard_size, len(folder)):  # shard complete
            meta = shard_fingerprint(cfg, folder, shard)
            meta.update(skipped=skipped, latent_shape=list(latent_shape))
            if cfg.latent_norm == "channel":
                meta.update(latent_sums=sums)  # None for a shard of unreadable images only
            finish_shard(cfg.features_path, shard, buf, row, np.asarray(labels, np.int64), meta,
                         images=images)
            state = None
    bar.close()


def _open_image_writer(cfg: ExtractConfig, shard: int, capacity: int, folder: ImageFolder):
    """The uint8 (capacity, C, S, S) image buffer of a shard with --keep-images, else None."""
    if not cfg.keep_images:
        return None
    shape = (1 if folder.grayscale else 3, cfg.image_size, cfg.image_size)
    return open_shard_writer(cfg.features_path, shard, capacity, shape, "uint8", kind="images")


def _write_final_index(cfg, folder, num_shards) -> dict:
    """Rank 0, after the barrier: collect shard metas, write skipped.txt and index.json."""
    metas = [read_shard_meta(cfg.features_path, s) for s in range(num_shards)]
    missing = [shard_name(s) for s, m in enumerate(metas) if m is None]
    if missing:
        raise RuntimeError(f"shards {missing} are unfinished (did a rank fail?); rerun "
                           "extract_features.py with the same arguments to complete them")
    shapes = {tuple(m["latent_shape"]) for m in metas}
    if len(shapes) != 1:
        raise RuntimeError(f"shards disagree on the latent shape {sorted(shapes)}; delete "
                           f"{cfg.features_path!r} and extract again")
    shapes_c = next(iter(shapes))[0]
    skipped = [item for m in metas for item in m["skipped"]]
    lines = "".join(f"{p}\t{' '.join(str(e).split())}\n" for p, e in skipped)
    skipped_path = Path(cfg.features_path) / "skipped.txt"
    atomic_write_text(skipped_path, lines)
    shards = [{"name": shard_name(s), "count": int(m["count"])} for s, m in enumerate(metas)]
    if sum(s["count"] for s in shards) == 0:
        raise RuntimeError(f"all {len(folder)} images under {cfg.data_path!r} were unreadable; "
                           f"see {skipped_path}")
    settings = dataclasses.asdict(cfg)
    for key in ("features_path", "num_workers"):  # where/how fast, not what was computed
        settings.pop(key)
    return write_index(cfg.features_path, shards=shards, latent_shape=shapes.pop(),
                       dtype=cfg.dtype, class_names=folder.classes, image_size=cfg.image_size,
                       vae=cfg.vae, flips="horizontal",
                       latent_norm=_index_latent_norm(cfg, metas, shapes_c),
                       num_skipped=len(skipped), extract_settings=settings,
                       image_shape=metas[0].get("image_shape") if cfg.keep_images else None)


def extract_features(cfg: ExtractConfig) -> dict | None:
    """Run (or resume) an extraction; returns the index on rank 0, None on other ranks."""
    cfg.validate()
    # Every input is checked before the process group and the features folder exist.
    folder = _open_images(cfg)
    ctx = init_distributed()
    try:
        num_shards = -(-len(folder) // cfg.shard_size)
        Path(cfg.features_path).mkdir(parents=True, exist_ok=True)
        pending, done = find_pending(cfg, folder, num_shards)
        # Every rank must see the same pending list before any rank finishes a shard.
        ctx.barrier()
        mine = pending[ctx.rank :: ctx.world_size]  # round-robin, balanced on resume too
        if ctx.rank == 0:
            print(f"{len(folder):,} images in {len(folder.classes):,} classes -> {num_shards} "
                  f"shards ({len(done)} already done) in {cfg.features_path}; "
                  f"{ctx.world_size} rank(s) on {ctx.device}", flush=True)
        if mine:  # a rank with nothing left to do never loads (or downloads) the VAE
            vae, latent_shape = _load_vae(cfg, ctx.device)
            _run_shards(cfg, folder, mine, vae, latent_shape, ctx)
        ctx.barrier()
        index = None
        if ctx.rank == 0:
            index = _write_final_index(cfg, folder, num_shards)
            latent_shape = index["latent_shape"]
            print(f"wrote {index['num_images']:,} images in {num_shards} shards, latents "
                  f"{tuple(latent_shape)} {cfg.dtype}, to {cfg.features_path}; skipped "
                  f"{index['num_skipped']} unreadable image(s)"
                  + (f" (listed in {Path(cfg.features_path) / 'skipped.txt'})"
                     if index["num_skipped"] else ""), flush=True)
        ctx.barrier()  # other ranks return only once the index exists
        return index
    finally:
        ctx.close()
