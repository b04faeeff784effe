"""extract_features.py --keep-images: the ADM-cropped uint8 image beside each latent in the shards,
read through the same index (slot 1: the mirror); readers that do not ask for images see no change."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.data import extract_cli as extract_features
from dit_fast.data import LatentDataset, center_crop_arr, pixels_to_tensor
from dit_fast.data.latents import write_latent_dataset
from tests.test_extract_features import _single_process_env, image_tree  # noqa: F401  (fixtures)
from tests.vae_helpers import save_tiny_vae


def _run(data, out, *extra):
    argv = ["--data-path", str(data), "--features-path", str(out), "--image-size", "16",
            "--shard-size", "4", "--batch-size", "3", "--num-workers", "0"]
    assert extract_features.main(argv + list(extra)) == 0


def test_tiny_vae_keeps_the_cropped_images_beside_the_latents(image_tree, tmp_path):  # noqa: F811
    vae_dir = save_tiny_vae(tmp_path / "vae")
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    _run(image_tree, plain, "--vae", str(vae_dir))
    _run(image_tree, kept, "--vae", str(vae_dir), "--keep-images")
    ds, ref = LatentDataset(kept), LatentDataset(plain)
    assert ds.image_shape == (3, 16, 16) and ref.image_shape is None
    assert "image_shape" not in json.loads((plain / "index.json").read_text())
    assert sorted(p.name for p in kept.glob("shard-00000.*")) == [
        "shard-00000.images.npy", "shard-00000.labels.npy", "shard-00000.latents.npy",
        "shard-00000.meta.json"]
    readable = [p for p in sorted(image_tree.rglob("*")) if p.is_file() and p.name != "corrupt.png"]
    assert len(ds) == len(readable) == 11
    for k, path in enumerate(readable):
        crop = torch.from_numpy(center_crop_arr(Image.open(path).convert("RGB"), 16)).permute(2, 0, 1)
        image, mirror = ds.get_image(k, 0), ds.get_image(k, 1)
        assert image.dtype == torch.uint8 and torch.equal(image, crop)
        assert torch.equal(mirror, crop.flip(-1))
        # The latents are the same numbers as without --keep-images (same seeded posterior).
        assert torch.equal(ds[k][0], ref[k][0]) and ds[k][1] == ref[k][1]
        assert torch.equal(ds.get(k, 1)[0], ref.get(k, 1)[0])
    with pytest.raises(ValueError, match="--keep-images"):
        ref.get_image(0, 0)


def test_resume_recomputes_a_shard_whose_images_are_gone(image_tree, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "px"
    _run(image_tree, out, "--vae", "none", "--keep-images")
    before = LatentDataset(out).get_image(5, 0)
    (out / "shard-00001.images.npy").unlink()
    capsys.readouterr()
    _run(image_tree, out, "--vae", "none", "--keep-images")
    assert "(2 already done)" in capsys.readouterr().out
    assert torch.equal(LatentDataset(out).get_image(5, 0), before)
    # A rerun without the flag is another extraction: refused, nothing mixed.
    argv = ["--data-path", str(image_tree), "--features-path", str(out), "--vae", "none",
            "--image-size", "16", "--shard-size", "4", "--batch-size", "3", "--num-workers", "0"]
    assert extract_features.main(argv) == 2


def test_in_memory_writer_and_a_damaged_image_file(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((5, 2, 4, 2, 2)).astype(np.float32)
    images = rng.integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    write_latent_dataset(tmp_path / "d", latents, np.arange(5) % 2, class_names=["a", "b"],
                         image_size=16, vae="ema", shard_size=2, images=images, flips="duplicate")
    ds = LatentDataset(tmp_path / "d")
    assert torch.equal(ds.get_image(3, 0), torch.from_numpy(images[3]))
    assert torch.equal(ds.get_image(3, 1), torch.from_numpy(images[3]))   # "duplicate": no mirror
    np.save(tmp_path / "d" / "shard-00001.images.npy", images[:1])
    with pytest.raises(ValueError, match="images"):
        LatentDataset(tmp_path / "d")
