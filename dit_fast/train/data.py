"""Training data: per-rank sharding with an exact, resumable order, and the checks that run first.

The order of an epoch is a function of (seed, epoch) only, like torch's DistributedSampler, so a run
resumed at (epoch, step_in_epoch) sees exactly the batches the uninterrupted run saw. For packed
latents (both flips stored) the flip is drawn per visit from the same seeded generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..vae import is_pixel_space, vae_downsample
from ..preempt import worker_ignores_stop_signals


@dataclass
class DataInfo:
    """What the model needs to know about the data."""

    dataset: torch.utils.data.Dataset
    in_channels: int
    input_size: int
    has_flips: bool  # items are (2, C, h, w): pick a slot per visit
    vae: object = None  # --data-path with a VAE: encodes each batch on the fly (on the CPU here)
    has_images: bool = False  # the uint8 image of each item can be read beside it (REPA's encoder)
    latent_norm: object = None  # the LatentNorm the model's inputs carry (None: pixels, or unrecorded)


class _KeyedView(torch.utils.data.Dataset):
    """A dataset seen through compound keys (i, extra): the ShardOrder hands the extra to the wrapper."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)


class FlipPicker(_KeyedView):
    """Wraps a LatentDataset: index (i, flip) -> (latents[flip] (C, h, w), label); reads that slot only.
    ``with_images``: (latents, label, uint8 image (C, S, S)), the image through the same index and flip."""

    def __init__(self, dataset, with_images: bool = False):
        super().__init__(dataset)
        self.with_images = with_images

    def __getitem__(self, key):
        i, flip = key
        latents, label = self.dataset.get(i, flip)  # (C, h, w): half the bytes of both slots
        if not self.with_images:
            return latents, label
        return latents, label, self.dataset.get_image(i, flip)


class EpochKeyedWithImages(_KeyedView):
    """EpochKeyed for an ImageFolder whose uint8 crop is needed too: key (i, epoch) -> (x in [-1, 1],
    label, uint8 (C, S, S)), both from one read of the file with the epoch's flip."""

    def __getitem__(self, key):
        from ..data.image_folder import pixels_to_tensor
        i, epoch = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        arr = self.dataset.load_pixels(i)                 # (S, S, C) uint8, unflipped
        if self.dataset.flip_decision(i):
            arr = arr[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return pixels_to_tensor(arr), self.dataset.samples[i][1], image


class EpochKeyed(_KeyedView):
    """Wraps a dataset with per-epoch behaviour (ImageFolder's seeded flips): key (i, epoch) ->
    dataset[i] in that epoch. The epoch travels with the index because persistent DataLoader
    workers hold their own copy of the dataset, which a set_epoch in the main process never reaches."""

    def __getitem__(self, key):
        i, epoch = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[i]


class ShardOrder(torch.utils.data.Sampler):
    """Per-rank micro-batches of one epoch, optionally starting after ``skip_batches``.

    Rank r takes positions r, r + W, r + 2W, ... of a seeded permutation (DistributedSampler's
    split, padded by wrapping so every rank gets the same count) and cuts them into full
    micro-batches (DiT drops the last partial batch). Items are ``(index, flip)`` when
    ``with_flips`` else plain indices.
    """

    def __init__(self, num_items: int, rank: int, world_size: int, micro_batch: int, seed: int,
                 with_flips: bool, with_epoch: bool = False):
        self.n, self.rank, self.world = num_items, rank, world_size
        self.micro_batch, self.seed, self.with_flips = micro_batch, seed, with_flips
        self.with_epoch = with_epoch  # items (index, epoch) for EpochKeyed
        self.epoch, self.skip_batches = 0, 0
        self.per_rank = math.ceil(num_items / world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; skip its first ``skip_batches`` micro-batches (resume)."""
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.micro_batch

    def _epoch_items(self) -> list:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        flips = torch.randint(0, 2, (self.n,), generator=g)  # one flip per position and visit
        pad = self.per_rank * self.world - self.n
        positions = torch.arange(self.n + pad) % self.n
        mine = positions[self.rank::self.world]
        if self.with_epoch:
            return [(i, self.epoch) for i in perm[mine].tolist()]
        if not self.with_flips:
            return perm[mine].tolist()
        return list(zip(perm[mine].tolist(), flips[mine].tolist()))

    def __iter__(self):
        items = self._epoch_items()
        for b in range(self.skip_batches, self.batches_per_epoch()):
            yield items[b * self.micro_batch:(b + 1) * self.micro_batch]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.skip_batches)


def open_training_data(cfg: Config) -> DataInfo:
    """Open --features-path or --data-path and check it against the model config before any step.

    Raises FileNotFoundError / ValueError with what was wrong and the flag to change.
    """
    d, m = cfg.data, cfg.model
    if d.features_path:
        return _open_latents(d.features_path, cfg)
    from ..data import ImageFolder
    root = Path(d.data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-path {str(root)!r} is not a directory of class folders")
    ds = ImageFolder(root, m.image_size, random_flip=d.random_flip, seed=cfg.train.global_seed)
    if len(ds) == 0:
        raise ValueError(f"--data-path {str(root)!r} has no images")
    _check_label_list(ds.targets, m.num_classes, str(root))
    if is_pixel_space(d.vae):
        return DataInfo(ds, in_channels=int(ds[0][0].shape[0]), input_size=m.image_size,
                        has_flips=False, has_images=True)
    from ..vae import load_vae
    vae = load_vae(d.vae, device="cpu")
    if m.image_size % vae.downsample:
        raise ValueError(f"--image-size {m.image_size} is not divisible by the VAE's downsample "
                         f"factor {vae.downsample}")
    return DataInfo(ds, in_channels=vae.latent_channels, input_size=m.image_size // vae.downsample,
                    has_flips=False, vae=vae, latent_norm=vae.norm, has_images=True)


def _flag_downsample(spec: str, ds) -> int | None:
    """Pixels per latent implied by --vae (dit_fast.vae.vae_downsample), or None when --vae is the
    very VAE that produced these latents: consistent by construction."""
    if spec == str(ds.vae) and not is_pixel_space(ds.vae):
        return None
    return vae_downsample(spec)


def _open_latents(path: str, cfg: Config) -> DataInfo:
    from ..data import LatentDataset
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--features-path {str(p)!r} does not exist; run extract_features.py "
                                "--data-path <images> --features-path <dir> first")
    if p.is_dir() and not any(p.iterdir()):
        raise FileNotFoundError(f"--features-path {str(p)!r} is empty; run extract_features.py first")
    ds = LatentDataset(p)
    if len(ds) == 0:
        raise ValueError(f"--features-path {str(p)!r} holds no latents")
    m = cfg.model
    h = ds.latent_shape[1]
    down = _flag_downsample(cfg.data.vae, ds)
    want = h if down is None else m.image_size // down
    if ds.latent_shape[1:] != (want, want) or ds.image_size != m.image_size:
        hint = " --vae none" if is_pixel_space(ds.vae) else f" --vae {ds.vae}"
        raise ValueError(
            f"latents in {str(p)!r} are {tuple(ds.latent_shape)} (extracted at image size "
            f"{ds.image_size}, vae {ds.vae!r}), but --image-size {m.image_size} with --vae "
            f"{cfg.data.vae!r} needs {want}x{want} at image size {m.image_size}; pass "
            f"--image-size {ds.image_size}{hint} or extract the features again")
    _check_latent_channels(cfg.data.vae, ds, p)
    ds.check_labels(m.num_classes)
    return DataInfo(ds, in_channels=ds.latent_shape[0], input_size=h, has_flips=True,
                    latent_norm=ds.latent_norm, has_images=ds.image_shape is not None)


def _check_latent_channels(spec: str, ds, path: Path) -> None:
    """The --vae that will decode this run's samples must have the features' latent channels."""
    from ..vae import model_channels
    if is_pixel_space(ds.vae) or is_pixel_space(spec) or spec == str(ds.vae):
        return
    if model_channels(spec) != ds.latent_shape[0]:
        raise ValueError(f"latents in {str(path)!r} have {ds.latent_shape[0]} channels (vae "
                         f"{ds.vae!r}), but --vae {spec!r} has {model_channels(spec)}; pass "
                         f"--vae {ds.vae}")


def _check_label_list(labels, num_classes: int, source: str) -> None:
    from ..data import check_labels
    check_labels(labels, num_classes, source=source)


def build_loader(info: DataInfo, cfg: Config, rank: int, world_size: int, device: torch.device):
    """DataLoader + its ShardOrder (the batch order); the loader never draws from the global torch RNG."""
    micro = cfg.train.micro_batch_size
    per_epoch = not info.has_flips and hasattr(info.dataset, "set_epoch")
    order = ShardOrder(len(info.dataset), rank, world_size, micro,
                                    cfg.train.global_seed, with_flips=info.has_flips,
                                    with_epoch=per_epoch)
    if order.batches_per_epoch() < cfg.train.grad_accum:
        raise ValueError(
            f"{len(info.dataset)} items give rank {rank} fewer than one optimizer step per epoch "
            f"(micro batch {micro} x grad accumulation {cfg.train.grad_accum}); lower "
            "--global-batch-size or use more data")
    from .objective import needs_images
    images = needs_images(cfg)
    dataset = FlipPicker(info.dataset, images) if info.has_flips else (
        (EpochKeyedWithImages if images else EpochKeyed)(info.dataset) if per_epoch else info.dataset)
    workers = cfg.data.num_workers
    # A private generator: DataLoader draws a base seed per iterator, which would otherwise
    # consume the global RNG and make a resumed run diverge from the uninterrupted one.
    # Persistent workers: forked once, not at every epoch boundary (forking a process whose
    # gloo/DeepSpeed threads hold locks is how an epoch start can hang); a worker that still
    # delivers nothing within --collective-timeout raises instead of idling.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=order, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        timeout=cfg.train.collective_timeout if workers > 0 else 0,
        worker_init_fn=worker_ignores_stop_signals if workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.train.global_seed))
    return loader, order


def set_data_epoch(info: DataInfo, order: ShardOrder, epoch: int, skip: int) -> None:
    """Select ``epoch``'s order (and ImageFolder's flips), skipping ``skip`` micro-batches."""
    order.set_epoch(epoch, skip)
    if hasattr(info.dataset, "set_epoch"):
        info.dataset.set_epoch(epoch)


def close_workers(loader) -> None:
    """End the persistent DataLoader workers now, the graceful way (their done event). Left to
    interpreter exit, multiprocessing would SIGTERM them, which they ignore (preempt.py): an
    error path that keeps the loader alive until then would wait on them forever."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None
