"""Data for dit_fast: raw images (ADM crop), packed latent shards, feature extraction, the demo set.

    from dit_fast.data import ImageFolder, LatentDataset, center_crop_arr, digits_dataset
"""
from .extract import ExtractConfig, extract_features
from .image_folder import IMG_EXTENSIONS, ImageFolder, center_crop_arr, find_image_files, pixels_to_tensor
from .latents import (INDEX_NAME, LatentDataset, check_labels, read_index, write_index,
                      write_latent_dataset)

__all__ = [
    "IMG_EXTENSIONS", "INDEX_NAME", "ExtractConfig", "ImageFolder", "LatentDataset",
    "center_crop_arr", "check_labels", "digits_dataset", "extract_features", "find_image_files",
    "pixels_to_tensor", "read_index", "write_digits_features", "write_index", "write_latent_dataset"]


def __getattr__(name):
    # Imported on first use so `python -m dit_fast.data.digits` runs without runpy's
    # "found in sys.modules" warning.
    if name in ("digits_dataset", "write_digits_features"):
        from . import digits

        return getattr(digits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
