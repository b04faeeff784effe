"""dit_fast.data: ADM crop, ImageFolder, packed latent storage, LatentDataset errors, digits."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.data import (ImageFolder, LatentDataset, center_crop_arr, check_labels,
                           digits_dataset, pixels_to_tensor, write_digits_features,
                           write_latent_dataset)


def _sample_photos():
    datasets = pytest.importorskip("sklearn.datasets")
    china, flower = datasets.load_sample_images().images  # (427, 640, 3) uint8 each
    return china, flower


def _expected_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's crop written another way: explicit size bookkeeping and PIL's crop box."""
    w, h = img.size
    while w >= 2 * size and h >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    s = size / min(w, h)
    w, h = round(w * s), round(h * s)
    img = img.resize((w, h), Image.BICUBIC)
    x0, y0 = (w - size) // 2, (h - size) // 2
    return np.array(img.crop((x0, y0, x0 + size, y0 + size)))


@pytest.mark.parametrize("hw", [(427, 640), (640, 427), (7, 5), (33, 100), (257, 256), (64, 64)])
@pytest.mark.parametrize("size", [8, 16, 32, 256])
def test_center_crop_matches_independent_computation(hw, size):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    out = center_crop_arr(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _expected_crop(img, size))


def test_center_crop_photo_grey_and_constant():
    china, _ = _sample_photos()
    img = Image.fromarray(china)
    np.testing.assert_array_equal(center_crop_arr(img, 64), _expected_crop(img, 64))
    grey = center_crop_arr(img.convert("L"), 24)
    assert grey.shape == (24, 24)
    flat = Image.new("RGB", (50, 13), (10, 200, 33))  # upscaled, non-square
    assert (center_crop_arr(flat, 32) == np.array([10, 200, 33], np.uint8)).all()
    with pytest.raises(ValueError, match="positive"):
        center_crop_arr(img, 0)


def test_pixels_to_tensor_matches_totensor_normalize():
    px = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    x = pixels_to_tensor(px)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    # ToTensor divides by 255, Normalize(0.5, 0.5) subtracts 0.5 and divides by 0.5, in float32.
    ref = (torch.arange(256, dtype=torch.float32).reshape(16, 16) / 255 - 0.5) / 0.5
    assert torch.equal(x[1], ref) and x.min() == -1 and x.max() == 1


@pytest.fixture
def image_tree(tmp_path):
    china, flower = _sample_photos()
    root = tmp_path / "images"
    (root / "b_flower").mkdir(parents=True)
    (root / "a_china" / "nested").mkdir(parents=True)
    Image.fromarray(china).save(root / "a_china" / "china.jpg")
    Image.fromarray(flower).save(root / "b_flower" / "flower.JPEG")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(
        root / "a_china" / "nested" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (18, 18, 4), dtype=np.uint8)).save(
        root / "b_flower" / "rgba.png")
    (root / "b_flower" / "notes.txt").write_text("not an image: ignored by extension")
    return root


def test_image_folder_labels_values_and_modes(image_tree):
    ds = ImageFolder(image_tree, 16, random_flip=False)
    assert ds.classes == ["a_china", "b_flower"] and len(ds) == 4
    assert [lbl for _, lbl in ds.samples] == [0, 0, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        path = ds.samples[i][0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == ds.samples[i][1]
        want = center_crop_arr(Image.open(path).convert("RGB"), 16)
        assert torch.equal(x, pixels_to_tensor(want))
    g = ImageFolder(image_tree, 16, random_flip=False, grayscale=True)
    assert g[0][0].shape == (1, 16, 16)


def test_image_folder_flips_are_seeded_per_epoch(image_tree):
    ds = ImageFolder(image_tree, 8, random_flip=True, seed=3)
    plain = ImageFolder(image_tree, 8, random_flip=False)
    pattern = lambda d: [d.flip_decision(i) for i in range(len(d))]  # noqa: E731
    first = pattern(ds)
    assert first == pattern(ImageFolder(image_tree, 8, seed=3))  # reproducible across instances
    patterns = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        patterns.add(tuple(pattern(ds)))
    assert len(patterns) > 1  # epochs differ
    ds.set_epoch(0)
    for i, flipped in enumerate(first):
        want = plain[i][0].flip(-1) if flipped else plain[i][0]
        assert torch.equal(ds[i][0], want)


def test_image_folder_errors(tmp_path, image_tree):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope", 16)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolder(tmp_path / "flat", 16)
    (image_tree / "c_empty").mkdir()
    with pytest.raises(FileNotFoundError, match="c_empty"):
        ImageFolder(image_tree, 16)
    (image_tree / "c_empty" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = ImageFolder(image_tree, 16)
    with pytest.raises(OSError, match="broken.png"):
        ds[len(ds) - 1]


def _tiny_latents(n=7, shape=(4, 2, 2), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, *shape)).astype(np.float32), rng.integers(0, 3, n)


def test_latent_dataset_roundtrip_mmap_and_pickle(tmp_path):
    lat, labels = _tiny_latents()
    write_latent_dataset(tmp_path / "f", lat, labels, class_names=["x", "y", "z"],
                         image_size=16, vae="ema", shard_size=3, latent_scale=0.18215)
    assert sorted(p.name for p in (tmp_path / "f").glob("*.latents.npy")) == [
        "shard-00000.latents.npy", "shard-00001.latents.npy", "shard-00002.latents.npy"]
    shard1 = np.load(tmp_path / "f" / "shard-00001.latents.npy", mmap_mode="r")
    assert shard1.shape == (3, 2, 4, 2, 2)
    ds = LatentDataset(tmp_path / "f")
    assert len(ds) == 7 and ds.latent_shape == (4, 2, 2) and ds.num_classes == 3
    assert ds.class_names == ["x", "y", "z"] and ds.image_size == 16 and ds.vae == "ema"
    for i in range(7):
        z, y = ds[i]
        assert z.dtype == torch.float32 and z.shape == (2, 4, 2, 2) and y == labels[i]
        assert torch.equal(z, torch.from_numpy(lat[i]))
    assert torch.equal(ds[-1][0], ds[6][0])
    for flip in (0, 1):
        z, y = ds.get(5, flip)
        assert torch.equal(z, torch.from_numpy(lat[5, flip])) and y == labels[5]
    with pytest.raises(ValueError, match="flip"):
        ds.get(0, 2)
    with pytest.raises(IndexError):
        ds[7]
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert torch.equal(clone[4][0], ds[4][0])


def test_latent_dataset_float16_storage(tmp_path):
    lat, labels = _tiny_latents()
    write_latent_dataset(tmp_path, lat, labels, class_names="abc", image_size=8, dtype="float16")
    z, _ = LatentDataset(tmp_path)[2]
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, torch.from_numpy(lat[2]), atol=2e-3, rtol=2e-3)


def test_latent_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*extract_features.py"):
        LatentDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="run extract_features.py"):
        LatentDataset(tmp_path / "empty")
    lat, labels = _tiny_latents()
    root = write_latent_dataset(tmp_path / "f", lat, labels, class_names="abc", image_size=8,
                                shard_size=4)
    index = (root / "index.json").read_text()
    (root / "index.json").write_text(index[: len(index) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        LatentDataset(root)
    (root / "index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="corrupt or foreign"):
        LatentDataset(root)
    (root / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        LatentDataset(root)
    (root / "index.json").write_text(index)
    LatentDataset(root)
    (root / "shard-00001.labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.labels.npy"):
        LatentDataset(root)
    np.save(root / "shard-00001.labels.npy", np.zeros(2, np.int64))  # wrong count
    with pytest.raises(ValueError, match="shard-00001"):
        LatentDataset(root)


def test_check_labels_names_values_and_counts(tmp_path):
    check_labels(np.array([0, 1, 2]), 3)
    msg = r"outside \[0, 3\): label 3 x 2, label 7 x 1.*--num-classes 8"
    with pytest.raises(ValueError, match=msg):
        check_labels(np.array([0, 3, 3, 7, 1]), 3)
    with pytest.raises(ValueError, match="label -1 x 1.*non-negative"):
        check_labels(np.array([-1, 0]), 3)
    lat, _ = _tiny_latents(n=4)
    ds = LatentDataset(write_latent_dataset(tmp_path, lat, [0, 1, 5, 5], class_names="abcdef",
                                            image_size=8))
    ds.check_labels(6)
    with pytest.raises(ValueError, match="label 5 x 2"):
        ds.check_labels(5)


def test_digits_dataset_shape_range_labels():
    pytest.importorskip("sklearn")
    x, y = digits_dataset(16)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64 and set(y.tolist()) == set(range(10))
    assert x.min() == -1.0 and x.max() == 1.0
    x8, _ = digits_dataset(8)
    from sklearn.datasets import load_digits
    np.testing.assert_allclose(x8[:, 0], load_digits().images / 8.0 - 1.0, atol=1e-6)
    xn, _ = digits_dataset(16, mode="nearest")
    np.testing.assert_array_equal(xn[:, :, ::2, ::2], x8)
    with pytest.raises(ValueError):
        digits_dataset(4)


def test_write_digits_features_is_trainable_format(tmp_path):
    pytest.importorskip("sklearn")
    write_digits_features(tmp_path / "digits", image_size=16)
    ds = LatentDataset(tmp_path / "digits")
    assert len(ds) == 1797 and ds.latent_shape == (1, 16, 16) and ds.num_classes == 10
    assert ds.vae == "none" and ds.flips == "duplicate" and ds.image_size == 16
    z, y = ds[10]
    assert torch.equal(z[0], z[1])  # a mirrored digit is not a digit: both slots hold the image
    x, labels = digits_dataset(16)
    assert torch.equal(z[0], torch.from_numpy(x[10])) and y == labels[10]
    ds.check_labels(10)


def test_digits_module_cli(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from dit_fast.data.digits import main

    main(["--features-path", str(tmp_path / "d"), "--image-size", "8"])
    assert "wrote 1797 digits" in capsys.readouterr().out
    assert LatentDataset(tmp_path / "d").latent_shape == (1, 8, 8)
