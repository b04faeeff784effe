"""Writing samples to disk: the PNG grid of sample.py, the PNG folder and .npz of sample_ddp.py.
(Reading training images is dit_fast.data.image_folder.)

`make_grid` / `save_image` reproduce torchvision.utils' functions of the same names (the original
sample.py saves with ``save_image(samples, "sample.png", nrow=4, normalize=True, value_range=(-1, 1))``)
operation for operation, so the same tensor gives the same bytes of pixels without torchvision.
`to_uint8_hwc` is sample_ddp.py's conversion; `write_npz_from_pngs` streams the ADM evaluation
suite's layout (``arr_0``: uint8, N x H x W x 3) to disk atomically without holding all N images.
"""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit_fast.atomic import atomic_write


def make_grid(tensor: torch.Tensor, nrow: int = 8, padding: int = 2, normalize: bool = False,
              value_range: tuple[float, float] | None = None, scale_each: bool = False,
              pad_value: float = 0.0) -> torch.Tensor:
    """Tile images (N, C, H, W) into one image (C, H', W'), as torchvision.utils.make_grid.

    Images are laid out row-major, `nrow` per row, with `padding` pixels of `pad_value` around and
    between them. With `normalize`, values are clamped to `value_range` (default: the tensor's min and
    max) and mapped to [0, 1]. A single image is returned without padding (torchvision does the same).
    """
    if isinstance(tensor, (list, tuple)):
        tensor = torch.stack(list(tensor), dim=0)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"make_grid expects a tensor or a list of tensors, got {type(tensor).__name__}")
    if tensor.dim() == 2:  # one single-channel image (H, W)
        tensor = tensor.unsqueeze(0)
    if tensor.dim() == 3:  # one image (C, H, W)
        if tensor.size(0) == 1:
            tensor = torch.cat((tensor, tensor, tensor), 0)
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4:
        raise ValueError(f"make_grid expects (N, C, H, W) images, got shape {tuple(tensor.shape)}")
    if tensor.size(1) == 1:  # grey images are shown as RGB
        tensor = torch.cat((tensor, tensor, tensor), 1)

    if normalize:
        tensor = tensor.clone()  # normalisation below is in place
        if value_range is not None and not isinstance(value_range, tuple):
            raise TypeError("value_range has to be a tuple (min, max) if specified")
        images = list(tensor) if scale_each else [tensor]
        for img in images:
            low, high = value_range if value_range is not None else (float(img.min()), float(img.max()))
            img.clamp_(min=low, max=high)
            img.sub_(low).div_(max(high - low, 1e-5))

    if tensor.size(0) == 1:
        return tensor.squeeze(0)

    nmaps = tensor.size(0)
    xmaps = min(nrow, nmaps)
    ymaps = int(math.ceil(float(nmaps) / xmaps))
    height, width = int(tensor.size(2) + padding), int(tensor.size(3) + padding)
    grid = tensor.new_full((tensor.size(1), height * ymaps + padding, width * xmaps + padding), pad_value)
    for k in range(nmaps):
        row, col = divmod(k, xmaps)
        grid.narrow(1, row * height + padding, height - padding) \
            .narrow(2, col * width + padding, width - padding).copy_(tensor[k])
    return grid


def grid_to_uint8(grid: torch.Tensor) -> np.ndarray:
    """(C, H, W) floats in [0, 1] -> (H, W, C) uint8, rounding as torchvision's save_image."""
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def save_image(tensor: torch.Tensor, path: str | os.PathLike, **grid_kwargs) -> Path:
    """Save images (N, C, H, W) as one PNG grid, as torchvision.utils.save_image; returns the path.

    Written atomically (dit_fast.atomic), so a crash never leaves half a PNG.
    """
    grid = make_grid(tensor.detach(), **grid_kwargs)
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    _save_png_atomic(Image.fromarray(grid_to_uint8(grid)), path)
    return path


def to_uint8_hwc(samples: torch.Tensor) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 exactly as the original sample_ddp.py."""
    # 128.0 (not 127.5 + rounding) is the original's choice; kept so the .npz bytes match.
    return torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write one (H, W, 3) or (H, W) uint8 image as PNG atomically (resume relies on complete files)."""
    _save_png_atomic(Image.fromarray(array), Path(path))


def write_npz_from_pngs(sample_dir: str | os.PathLike, num: int, npz_path: str | os.PathLike | None = None,
                        progress: bool = True) -> Path:
    """Pack {0..num-1:06d}.png of `sample_dir` into an .npz with ``arr_0`` (num, H, W, 3) uint8.

    Same file as the original ``np.savez(f"{sample_dir}.npz", arr_0=samples)`` (npy format 1.0 inside a
    zip, uncompressed) but streamed image by image (a 512 px 50K set is 39 GB) and renamed into place
    only when complete. Raises FileNotFoundError naming the first missing PNG.
    """
    sample_dir = Path(sample_dir)
    npz_path = Path(npz_path) if npz_path is not None else sample_dir.with_name(sample_dir.name + ".npz")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    first = _read_png(sample_dir, 0)
    shape = (num, *first.shape)
    indices = range(num)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="Building .npz file from samples")

    def write(out) -> None:
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                          "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                for i in indices:
                    img = first if i == 0 else _read_png(sample_dir, i)
                    if img.shape != first.shape:
                        raise ValueError(f"{sample_dir / f'{i:06d}.png'} has shape {img.shape}, expected "
                                         f"{first.shape} like 000000.png; delete the folder and resample")
                    f.write(np.ascontiguousarray(img).tobytes())

    atomic_write(npz_path, write)
    return npz_path


def _read_png(sample_dir: Path, i: int) -> np.ndarray:
    path = sample_dir / f"{i:06d}.png"
    if not path.exists():
        raise FileNotFoundError(f"missing sample {path}; rerun sample_ddp.py to finish sampling")
    img = np.asarray(Image.open(path)).astype(np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{path} has shape {img.shape}; the ADM evaluation suite needs RGB (H, W, 3) images")
    return img
