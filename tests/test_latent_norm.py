"""Any autoencoder: a 16-channel AutoencoderKL with its own scaling_factor and shift_factor goes
extract -> train -> sample with its latent normalisation applied exactly once each way, in both modes
(config: the VAE config's numbers; channel: per-channel mean/std measured at extraction). Every
expected value is computed here from the diffusers model itself, not through dit_fast.latent_norm."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from dit_fast.data import extract_cli as extract_features  # noqa: E402
from dit_fast.train import cli as train_cli  # noqa: E402
from dit_fast.data import ImageFolder, LatentDataset, pixels_to_tensor  # noqa: E402
from dit_fast.data.extract import posterior_seed  # noqa: E402
from dit_fast.distributed import free_port  # noqa: E402
from dit_fast.latent_norm import LatentNorm  # noqa: E402
from tests.vae_helpers import save_tiny_vae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCALE, SHIFT, CHANNELS = 0.3611, 0.1159, 16  # FLUX's numbers, on a 16-channel tiny VAE
SIZE, SHARD, BATCH = 8, 3, 2  # 8 px images -> 16 x 4 x 4 latents; 3 shards of <= 3 images
MODEL = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
         "--image-size", str(SIZE), "--num-classes", "2", "--num-workers", "0",
         "--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "2", "--precision", "fp32"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 16-channel VAE with scale and shift in its config, 8 images in 2 classes, both extractions.
    On one torch thread like the tests (a module fixture runs before their one_torch_thread), so a
    re-extraction inside a test computes the very same latents, bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make_inputs(tmp_path_factory)
    finally:
        torch.set_num_threads(before)


def _make_inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ae")
    vae_dir = save_tiny_vae(base / "vae16", latent_channels=CHANNELS, scaling_factor=SCALE,
                            shift_factor=SHIFT)
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = base / "images" / ("ab"[i % 2])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    feats = {mode: extract(base, vae_dir, mode) for mode in ("config", "channel")}
    return {"base": base, "vae": vae_dir, **feats}


def extract(base, vae_dir, mode, name=None):
    out = base / (name or f"feat-{mode}")
    assert extract_features.main([
        "--data-path", str(base / "images"), "--features-path", str(out), "--vae", str(vae_dir),
        "--image-size", str(SIZE), "--shard-size", str(SHARD), "--batch-size", str(BATCH),
        "--num-workers", "0", "--latent-norm", mode]) == 0
    return out


def raw_latents(base, vae_dir) -> torch.Tensor:
    """(N, 2, 16, 4, 4): the posterior samples the extraction draws, straight from diffusers."""
    from diffusers import AutoencoderKL
    ae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    folder = ImageFolder(base / "images", SIZE, random_flip=False)
    out = []
    for shard, first in enumerate(range(0, len(folder), SHARD)):  # batches of 2 and 1 per shard
        stop = min(first + SHARD, len(folder))
        for b, lo in enumerate(range(first, stop, BATCH)):
            idx = range(lo, min(lo + BATCH, stop))
            x = pixels_to_tensor(np.stack([folder.load_pixels(i) for i in idx]))
            g = torch.Generator().manual_seed(posterior_seed(0, shard, b))
            with torch.no_grad():
                z = ae.encode(torch.cat([x, x.flip(-1)])).latent_dist.sample(generator=g)
            out.append(torch.stack([z[:len(idx)], z[len(idx):]], dim=1))
    return torch.cat(out)


def stored(path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(Path(path).glob("shard-*.latents.npy"))])


def test_extraction_applies_the_normalisation_once(inputs):
    raw = raw_latents(inputs["base"], inputs["vae"])
    config, channel = LatentDataset(inputs["config"]), LatentDataset(inputs["channel"])
    seen = lambda ds: torch.stack([ds[i][0] for i in range(len(ds))])  # noqa: E731  what training reads
    assert config.latent_shape == channel.latent_shape == (CHANNELS, 4, 4)
    # config mode: the VAE config's shift and scale, stored already applied.
    assert config.index["latent_norm"] == {"mode": "config", "scale": SCALE, "shift": SHIFT}
    torch.testing.assert_close(seen(config), (raw - SHIFT) * SCALE, rtol=0, atol=1e-6)
    # channel mode: raw latents stored; exact fp64 statistics over all of them, both flips.
    on_disk = stored(inputs["channel"])
    torch.testing.assert_close(torch.from_numpy(on_disk), raw, rtol=0, atol=1e-6)
    x = on_disk.astype(np.float64)
    mean, std = x.mean(axis=(0, 1, 3, 4)), x.std(axis=(0, 1, 3, 4))
    rec = channel.index["latent_norm"]
    assert rec["mode"] == "channel" and channel.index["version"] == 2
    np.testing.assert_allclose(rec["mean"], mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rec["std"], std, rtol=1e-12)
    view = lambda v: torch.tensor(v, dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
    torch.testing.assert_close(seen(channel), (raw - view(mean)) / view(std), rtol=1e-6, atol=1e-6)
    assert abs(seen(channel).mean().item()) < 1e-5  # normalised once: zero mean per channel


def test_channel_statistics_survive_a_resumed_extraction(inputs, tmp_path):
    again = extract(inputs["base"], inputs["vae"], "channel", name=str(tmp_path / "again"))
    for f in list(again.glob("shard-00001.*")) + [again / "index.json"]:
        f.unlink()  # as if the run died with shard 1 in flight
    extract(inputs["base"], inputs["vae"], "channel", name=str(again))
    assert json.loads((again / "index.json").read_text())["latent_norm"] == \
        json.loads((inputs["channel"] / "index.json").read_text())["latent_norm"]


def _train(features, vae, results):
    """Plain `python train.py`, as a user runs it (a process each: DeepSpeed's groups are per process)."""
    args = [*MODEL, "--features-path", str(features), "--vae", str(vae), "--results-dir", str(results)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = Path(results).glob("*-DiT-S-2")
    return run


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """A trained run (2 steps) on each mode's features."""
    return {mode: _train(inputs[mode], inputs["vae"], tmp_path_factory.mktemp(f"res-{mode}"))
            for mode in ("config", "channel")}


def _sample_capturing_latents(run, out, monkeypatch):
    """sample.py --ckpt RUN with no other model flag; returns (the sampler's latents, the images)."""
    from dit_fast.sampling import grid
    seen = []
    real = grid.decode
    monkeypatch.setattr(grid, "decode", lambda z, vae: seen.append(z.clone()) or real(z, vae))
    result = grid.main(["--ckpt", str(run), "--num-sampling-steps", "2", "--class-labels", "0", "1",
                        "--device", "cpu", "--out", str(out)])
    return seen[0], result["images"]


@pytest.mark.parametrize("mode", ["config", "channel"])
def test_extract_train_sample_round_trip(inputs, runs, tmp_path, monkeypatch, mode):
    from diffusers import AutoencoderKL
    run = runs[mode]
    index = json.loads((Path(inputs[mode]) / "index.json").read_text())
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["latent_norm"] == index["latent_norm"] and saved["model"]["in_channels"] == CHANNELS

    z, images = _sample_capturing_latents(run, tmp_path / "s.png", monkeypatch)
    ae = AutoencoderKL.from_pretrained(str(inputs["vae"])).eval()
    if mode == "config":
        raw = z / SCALE + SHIFT
    else:
        rec = index["latent_norm"]
        raw = z * torch.tensor(rec["std"]).view(-1, 1, 1) + torch.tensor(rec["mean"]).view(-1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(images, ae.decode(raw).sample, rtol=1e-5, atol=1e-5)

    if mode == "channel":  # evaluation (sample_ddp.py) decodes the same way
        from dit_fast.sampling import fid_set, resumable
        got = []
        real = resumable.decode
        monkeypatch.setattr(resumable, "decode", lambda z, vae: got.append((z, real(z, vae))) or got[-1][1])
        fid_set.main(["--ckpt", str(run), "--num-sampling-steps", "2", "--num-fid-samples", "2",
                      "--per-proc-batch-size", "2", "--device", "cpu", "--sample-dir", str(tmp_path / "fid")])
        z2, images2 = got[0]
        raw2 = z2 * torch.tensor(rec["std"]).view(-1, 1, 1) + torch.tensor(rec["mean"]).view(-1, 1, 1)
        with torch.no_grad():
            torch.testing.assert_close(images2, ae.decode(raw2).sample, rtol=1e-5, atol=1e-5)


def test_export_records_the_normalisation(inputs, runs, tmp_path):
    from dit_fast.checkpoint import export as export_diffusers
    for mode, run in runs.items():
        out = tmp_path / f"pipe-{mode}"
        export_diffusers.main(["--ckpt", str(run), "--out", str(out), "--no-check"])
        vae_config = json.loads((out / "vae" / "config.json").read_text())
        rec = json.loads((Path(inputs[mode]) / "index.json").read_text())["latent_norm"]
        if mode == "config":
            assert (vae_config["scaling_factor"], vae_config["shift_factor"]) == (SCALE, SHIFT)
        else:
            assert vae_config["scaling_factor"] == 1.0 and vae_config["shift_factor"] is None
            assert (vae_config["latents_mean"], vae_config["latents_std"]) == (rec["mean"], rec["std"])


def test_resume_on_differently_normalised_features_is_one_line(inputs, runs, capsys):
    """The config-mode run resumed on the channel-mode features: one line, exit 2, nothing made."""
    results = runs["config"].parent
    step = sorted(runs["config"].glob("checkpoints/step-*"))[-1]
    before = sorted(str(p) for p in results.rglob("*"))
    code = train_cli.main([*MODEL, "--features-path", str(inputs["channel"]), "--vae", str(inputs["vae"]),
                           "--results-dir", str(results), "--resume", str(step)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "normalised" in lines[0], lines
    assert sorted(str(p) for p in results.rglob("*")) == before


def test_sd_config_is_dits_formula_bit_for_bit():
    from diffusers import AutoencoderKL
    norm = LatentNorm.from_vae_config(AutoencoderKL.load_config(str(_sd_like_config())))
    assert (norm.scale, norm.shift) == (0.18215, None)
    assert LatentNorm.from_vae_config({}).scale == 0.18215  # configs that predate the field
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(norm.normalize(x), x * 0.18215) and torch.equal(norm.denormalize(x), x / 0.18215)
    shifted = LatentNorm("config", scale=SCALE, shift=SHIFT)
    assert torch.equal(shifted.normalize(x), (x - SHIFT) * SCALE)
    assert torch.equal(shifted.denormalize(x), x / SCALE + SHIFT)


def _sd_like_config():
    import tempfile
    folder = Path(tempfile.mkdtemp())
    save_tiny_vae(folder)  # diffusers' defaults: scaling_factor 0.18215, no shift_factor
    return folder


@pytest.mark.slow
def test_two_ranks_measure_the_same_statistics(inputs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "extract_features.py"),
           "--data-path", str(inputs["base"] / "images"), "--features-path", str(out), "--vae",
           str(inputs["vae"]), "--image-size", str(SIZE), "--shard-size", str(SHARD), "--batch-size",
           str(BATCH), "--num-workers", "0", "--latent-norm", "channel"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "index.json").read_text() == (inputs["channel"] / "index.json").read_text()


def test_data_path_training_encodes_with_the_config_normalisation(inputs, tmp_path):
    """--data-path (encoding on the fly) normalises as extraction does, and the run records it."""
    from diffusers import AutoencoderKL

    from dit_fast.config import config_from_args
    from dit_fast.train.loop import prepare
    argv = [*MODEL, "--data-path", str(inputs["base"] / "images"), "--vae", str(inputs["vae"]),
            "--results-dir", str(tmp_path / "res")]
    resolved, _, info, _ = prepare(config_from_args(train_cli.build_parser().parse_args(argv)))
    assert resolved.data.latent_norm == {"mode": "config", "scale": SCALE, "shift": SHIFT}
    assert resolved.model.in_channels == CHANNELS
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ae = AutoencoderKL.from_pretrained(str(inputs["vae"])).eval()
    with torch.no_grad():
        want = (ae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(1)) - SHIFT) * SCALE
    torch.testing.assert_close(info.vae.encode(x, generator=torch.Generator().manual_seed(1)), want,
                               rtol=0, atol=1e-6)


def test_channels_and_downsampling_come_from_the_autoencoder_config(inputs):
    """What sample.py uses for a plain weights file: the VAE config, not SD's 4 channels / 8x."""
    from dit_fast.vae import model_channels, vae_downsample
    assert (model_channels(str(inputs["vae"])), vae_downsample(str(inputs["vae"]))) == (CHANNELS, 2)
    assert model_channels("none", 1) == 1 and vae_downsample("none") == 1
    with pytest.raises(ValueError, match="per-channel mean and std"):
        LatentNorm.from_dict({"mode": "channel", "mean": [0.0] * CHANNELS}, "index.json")
    with pytest.raises(ValueError, match="positive stds"):
        LatentNorm.from_dict({"mode": "channel", "mean": [0.0], "std": [0.0]}, "index.json")
