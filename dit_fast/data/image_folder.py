"""Raw images: ADM center crop, the [-1, 1] tensor convention, and an ImageFolder with seeded flips.

Everything here reproduces what DiT's train.py feeds its VAE (torchvision ImageFolder +
center_crop_arr + RandomHorizontalFlip + ToTensor + Normalize(0.5, 0.5)) bit for bit, without
depending on torchvision.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# torchvision's IMG_EXTENSIONS, matched case-insensitively as torchvision does, so the same tree
# yields the same file list (and therefore the same labels and order) as DiT's loader.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion image_datasets.py, used by DiT's train.py).

    Halve the image with a box filter while its short side is at least ``2 * image_size``, resize
    with bicubic so the short side equals ``image_size``, then take the central square.

    Args:
        pil_image: a PIL image, already in the mode you want (RGB, or L for greyscale).
        image_size: side of the output square, in pixels.

    Returns:
        uint8 array (image_size, image_size, 3) for RGB input ((S, S) for mode L).
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    img = pil_image
    # The repeated box halving is ADM's cheap anti-aliasing; it changes the pixels compared with a
    # single bicubic resize, so it is kept exactly for parity with DiT's data.
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = image_size / min(img.size)
    # Python's round() (half to even) is what ADM uses; math.floor/ceil would differ on .5 sizes.
    img = img.resize(tuple(round(side * scale) for side in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size].copy()  # writable, contiguous


def pixels_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 pixels (..., H, W, C) or (H, W) -> float32 (..., C, H, W) in [-1, 1].

    Same float ops, in the same order, as torchvision's ToTensor (divide by 255) followed by
    Normalize(mean=0.5, std=0.5), so the values are bit-identical to DiT's pipeline.
    """
    t = torch.from_numpy(np.ascontiguousarray(arr))  # a flipped view has negative strides
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    if t.ndim == 2:
        t = t.unsqueeze(-1)
    t = t.movedim(-1, -3).contiguous()  # (..., C, H, W)
    return t.to(torch.float32).div(255).sub(0.5).div(0.5)


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the sub-folders of ``root`` (one per class), as torchvision sorts them."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; "
                                "pass --data-path <dir>")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a directory; --data-path needs a folder "
                                 "with one sub-folder per class")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {str(root)!r}: expected one sub-folder per "
                                "class (for example train/n01440764/*.JPEG)")
    return classes


def find_image_files(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """List (path, label) for every image under ``root``/<class>/, in torchvision's order.

    Returns:
        (samples, class_names): samples sorted by class, then walk order, then file name.
    """
    classes = find_classes(root)
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        before = len(samples)
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), label))
        if len(samples) == before:
            empty.append(name)
    if empty:
        shown = ", ".join(repr(n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise FileNotFoundError(
            f"no images in {len(empty)} class folder(s) under {str(root)!r}: {shown}. "
            f"Supported extensions: {' '.join(IMG_EXTENSIONS)} (any case). Remove the empty "
            "folders or add images: every folder is a class.")
    return samples, classes


def load_image(path: str, grayscale: bool = False) -> Image.Image:
    """Open an image fully (so corrupt files fail here) and convert it to RGB (or L)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        # convert() forces the decode inside the `with`; palette/RGBA/CMYK/16-bit all become RGB.
        return img.convert("L" if grayscale else "RGB")


class ImageFolder(torch.utils.data.Dataset):
    """One folder per class -> (x float32 (C, S, S) in [-1, 1], label int).

    Labels are the sorted class-folder names' indices (torchvision's convention). The crop is
    ADM's ``center_crop_arr``. With ``random_flip`` each (epoch, index) gets a horizontal flip
    decided by a generator seeded from (seed, epoch, index), so a resumed run sees the same flips;
    call ``set_epoch(epoch)`` before building each epoch's DataLoader iterator.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, random_flip: bool = True,
                 seed: int = 0, *, grayscale: bool = False):
        self.root = str(root)
        self.image_size = int(image_size)
        self.random_flip = random_flip
        self.seed = int(seed)
        self.grayscale = grayscale
        self.epoch = 0
        self.samples, self.classes = find_image_files(self.root)
        self.targets = [label for _, label in self.samples]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern of ``epoch`` (each epoch flips another reproducible half)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def flip_decision(self, index: int) -> bool:
        """Whether item ``index`` is flipped in the current epoch (reproducible, p = 0.5)."""
        if not self.random_flip:
            return False
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return bool(rng.random() < 0.5)

    def load_pixels(self, index: int) -> np.ndarray:
        """Center-cropped, unflipped uint8 pixels (S, S, C); errors name the file."""
        path = self.samples[index][0]
        try:
            img = load_image(path, self.grayscale)
        except Exception as err:  # PIL raises many types; the path is what the user needs
            raise OSError(f"cannot read image {path!r}: {type(err).__name__}: {err}") from err
        arr = center_crop_arr(img, self.image_size)
        return arr[..., None] if arr.ndim == 2 else arr  # (S, S, C)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr = self.load_pixels(index)
        if self.flip_decision(index):
            arr = arr[:, ::-1]
        return pixels_to_tensor(arr), self.samples[index][1]  # (C, S, S)
