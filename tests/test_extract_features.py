"""extract_features.py end to end: pixel space, corrupt files, resume, crash, 2 ranks, tiny VAE."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.data import extract_cli as extract_features
from dit_fast.data import LatentDataset, center_crop_arr, pixels_to_tensor
from dit_fast.data import extract as extract_mod
from dit_fast.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def image_tree(tmp_path):
    """Two photos + 9 tiny images in 3 classes (one corrupt file): 11 readable of 12."""
    datasets = pytest.importorskip("sklearn.datasets")
    china, flower = datasets.load_sample_images().images
    root = tmp_path / "images"
    for name in ("cat", "dog", "eel"):
        (root / name).mkdir(parents=True)
    # Photos shrunk first so the test's crop stays cheap; still non-square.
    Image.fromarray(china).resize((96, 64)).save(root / "cat" / "china.jpg")
    Image.fromarray(flower).resize((64, 96)).save(root / "dog" / "flower.jpg")
    rng = np.random.default_rng(0)
    for i in range(9):
        shape = (12 + i, 20) if i % 3 else (16, 16, 4)  # RGBA among them
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            root / ("cat", "dog", "eel")[i % 3] / f"tiny{i}.png")
    (root / "eel" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _run(data, out, *extra):
    argv = ["--data-path", str(data), "--features-path", str(out), "--vae", "none",
            "--image-size", "16", "--shard-size", "4", "--batch-size", "3", "--num-workers", "0"]
    assert extract_features.main(argv + list(extra)) == 0


def _shard_files(out):
    return sorted(p.name for p in Path(out).glob("shard-*.npy"))


def test_pixel_space_end_to_end_with_corrupt_file(image_tree, tmp_path, capsys):
    out = tmp_path / "feats"
    _run(image_tree, out)
    captured = capsys.readouterr()
    assert "corrupt.png" in captured.err and "skipped 1 unreadable" in captured.out
    assert (out / "skipped.txt").read_text().startswith(str(image_tree / "eel" / "corrupt.png"))
    ds = LatentDataset(out)
    assert len(ds) == 11 and ds.latent_shape == (3, 16, 16) and ds.vae == "none"
    assert ds.class_names == ["cat", "dog", "eel"] and ds.index["num_skipped"] == 1
    assert len(_shard_files(out)) == 2 * 3  # 12 files / 4 per shard
    readable = [p for p in sorted(image_tree.rglob("*")) if p.is_file() and p.name != "corrupt.png"]
    by_path = {str(p): i for i, p in enumerate(readable)}
    assert len(by_path) == 11
    # Row k of the dataset is the k-th readable image in sorted order; slot 1 is its mirror.
    for k, path in enumerate(readable):
        z, y = ds[k]
        x = pixels_to_tensor(center_crop_arr(Image.open(path).convert("RGB"), 16))
        assert torch.equal(z[0], x) and torch.equal(z[1], x.flip(-1))
        assert ds.class_names[y] == path.parent.name


def test_grayscale_and_float16(image_tree, tmp_path):
    out = tmp_path / "grey"
    _run(image_tree, out, "--grayscale", "--dtype", "float16", "--num-workers", "2")
    ds = LatentDataset(out)
    assert ds.latent_shape == (1, 16, 16) and ds.dtype == "float16"
    assert np.load(out / "shard-00000.latents.npy", mmap_mode="r").dtype == np.float16


def test_resume_recomputes_only_missing_shard(image_tree, tmp_path, capsys):
    out = tmp_path / "feats"
    _run(image_tree, out)
    before = {n: (out / n).read_bytes() for n in _shard_files(out)}
    stats = {n: os.stat(out / n).st_mtime_ns for n in before}
    for p in out.glob("shard-00001.*"):
        p.unlink()
    (out / ".shard-00001.latents.npy.partial999").write_bytes(b"left by a killed run")
    capsys.readouterr()
    _run(image_tree, out)
    assert "(2 already done)" in capsys.readouterr().out
    after = {n: (out / n).read_bytes() for n in _shard_files(out)}
    assert after == before
    for n, mtime in stats.items():
        assert (os.stat(out / n).st_mtime_ns == mtime) == (not n.startswith("shard-00001"))
    assert not list(out.glob(".shard-*"))
    assert len(LatentDataset(out)) == 11


def test_rerun_with_other_settings_refuses_to_mix(image_tree, tmp_path, capsys):
    out = tmp_path / "feats"
    _run(image_tree, out)
    argv = ["--data-path", str(image_tree), "--features-path", str(out), "--vae", "none",
            "--image-size", "8", "--shard-size", "4", "--num-workers", "0"]
    assert extract_features.main(argv) == 2
    assert "different extraction" in capsys.readouterr().err


def test_crash_mid_run_keeps_finished_shards(image_tree, tmp_path, monkeypatch):
    out = tmp_path / "feats"
    real = extract_mod.encode_pair
    calls = []

    class Killed(Exception):
        pass

    def dying(pixels, vae, device, seed):
        calls.append(seed)
        if len(calls) == 4:  # the 4th batch is in shard 1 (batches 3+1 per 4-image shard)
            raise Killed("simulated kill")
        return real(pixels, vae, device, seed)

    monkeypatch.setattr(extract_mod, "encode_pair", dying)
    with pytest.raises(Killed):
        _run(image_tree, out)
    assert _shard_files(out) == ["shard-00000.labels.npy", "shard-00000.latents.npy"]
    with pytest.raises(FileNotFoundError, match="did not finish"):
        LatentDataset(out)
    monkeypatch.setattr(extract_mod, "encode_pair", real)
    _run(image_tree, out)
    fresh = tmp_path / "fresh"
    _run(image_tree, fresh)
    assert {n: (out / n).read_bytes() for n in _shard_files(out)} == {
        n: (fresh / n).read_bytes() for n in _shard_files(fresh)}


def test_bad_arguments(image_tree, tmp_path, capsys):
    base = ["--data-path", str(image_tree), "--features-path", str(tmp_path / "f")]
    assert extract_features.main(base + ["--vae", "ema", "--grayscale"]) == 2
    assert "--grayscale is for pixel space" in capsys.readouterr().err
    assert extract_features.main(base + ["--vae", "none", "--shard-size", "0"]) == 2
    missing = ["--data-path", str(tmp_path / "nope"), "--features-path", str(tmp_path / "f")]
    assert extract_features.main(missing + ["--vae", "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert extract_features.main(base + ["--vae", str(tmp_path / "no_such_vae_dir")]) == 2
    assert "no_such_vae_dir" in capsys.readouterr().err



@pytest.mark.slow
def test_two_ranks_match_one_rank(image_tree, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(image_tree, one)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # two ranks on one GPU would trip NCCL: compare on gloo/CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "extract_features.py"), "--data-path", str(image_tree),
           "--features-path", str(two), "--vae", "none", "--image-size", "16",
           "--shard-size", "4", "--batch-size", "3", "--num-workers", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout
    assert (one / "index.json").read_text() == (two / "index.json").read_text()
    assert (one / "skipped.txt").read_text() == (two / "skipped.txt").read_text()
    names = _shard_files(one)
    assert names == _shard_files(two)
    for n in names:
        assert (one / n).read_bytes() == (two / n).read_bytes(), n


def _tiny_vae_dir(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.save_pretrained(tmp_path / "tiny_vae")
    return tmp_path / "tiny_vae", vae.eval()


def test_tiny_vae_latents_both_flips_scaled(image_tree, tmp_path):
    import dit_fast.vae as vae_mod
    vae_dir, vae = _tiny_vae_dir(tmp_path)
    out = tmp_path / "latents"
    _run(image_tree, out, "--vae", str(vae_dir))
    ds = LatentDataset(out)
    down = 2  # two encoder blocks -> one 2x downsampling
    assert ds.latent_shape == (4, 16 // down, 16 // down) and len(ds) == 11
    assert ds.latent_scale == pytest.approx(vae_mod.LATENT_SCALE) == pytest.approx(0.18215)
    # Each stored latent is scale * (mean + std * eps) of its own image (slot 0) or mirror
    # (slot 1): standardising with the posterior of the right input must give N(0, 1) noise.
    readable = [p for p in sorted(image_tree.rglob("*")) if p.is_file() and p.name != "corrupt.png"]
    x = torch.stack([pixels_to_tensor(center_crop_arr(Image.open(p).convert("RGB"), 16))
                     for p in readable])  # (11, 3, 16, 16)
    z = torch.stack([ds[k][0] for k in range(len(ds))])  # (11, 2, 4, 8, 8)
    with torch.no_grad():
        for slot, inp in ((0, x), (1, x.flip(-1))):
            post = vae.encode(inp).latent_dist
            eps = (z[:, slot] / 0.18215 - post.mean) / post.std
            assert abs(eps.mean().item()) < 0.1 and 0.9 < eps.std().item() < 1.1, (slot, eps.std())
    again = tmp_path / "again"
    _run(image_tree, again, "--vae", str(vae_dir))  # seeded posterior: reproducible
    z_again = torch.stack([LatentDataset(again)[k][0] for k in range(len(ds))])
    if torch.cuda.is_available():  # cuDNN may pick other conv algorithms between runs
        torch.testing.assert_close(z_again, z, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(z_again, z)


def test_shard_of_only_corrupt_images_is_empty_not_lost(image_tree, tmp_path):
    _run(image_tree, tmp_path / "four")
    _run(image_tree, tmp_path / "one", "--shard-size", "1")  # corrupt.png alone in shard 8
    one, four = LatentDataset(tmp_path / "one"), LatentDataset(tmp_path / "four")
    assert [s["count"] for s in one.index["shards"]].count(0) == 1 and len(one) == len(four) == 11
    for k in range(11):
        assert torch.equal(one[k][0], four[k][0]) and one[k][1] == four[k][1]
        assert torch.equal(one.get(k, 1)[0], four[k][0][1])
