"""sample.py and sample_ddp.py end to end with a tiny random DiT (CPU, pixel space or a tiny VAE)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.sampling import grid as sample
from dit_fast.sampling import fid_set as sample_ddp
from tests.sampling_helpers import REPO, TINY_FLAGS, build_tiny, save_tiny_checkpoint

SIZE, CLASSES = 8, 10
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'kernels'}")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", input_size=SIZE,
                                in_channels=3, num_classes=CLASSES)


def _sample_args(ckpt, out, *extra):
    return [*TINY_FLAGS, "--ckpt", str(ckpt), "--vae", "none", "--image-size", str(SIZE),
            "--num-classes", str(CLASSES), "--num-sampling-steps", "5", "--class-labels", "1", "2", "3", "4", "5",
            "--out", str(out), *extra]


def _png(path):
    return np.asarray(Image.open(path))


# --------------------------------------------------------------------------------------- sample.py
def test_sample_grid_equals_our_own_seeded_ddpm_loop(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    result = sample.main(_sample_args(ckpt, out, "--seed", "3", "--cfg-scale", "2.5"))
    assert str(out.resolve()) in capsys.readouterr().out
    img = _png(out)
    assert img.shape == (2 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2, 3)  # 5 images, 4 per row, padding 2

    # What sample.py does, re-done by hand with our model and p_sample_loop: the CLI adds nothing to the
    # numbers. (That p_sample_loop equals the original's is tests/test_reference_parity.py's job.)
    from dit_fast.diffusion import create_diffusion
    torch.manual_seed(3)
    with torch.no_grad():
        model = build_tiny(input_size=SIZE, num_classes=CLASSES, in_channels=3)
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        model.eval()
        diffusion = create_diffusion("5")
        z = torch.randn(5, 3, SIZE, SIZE)
        y = torch.tensor([1, 2, 3, 4, 5])
        z, y = torch.cat([z, z], 0), torch.cat([y, torch.tensor([CLASSES] * 5)], 0)
        ref = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                      model_kwargs=dict(y=y, cfg_scale=2.5), device="cpu")
    assert torch.equal(result["images"], ref.chunk(2)[0])


def test_same_seed_same_image_other_seed_other_image(ckpt, tmp_path):
    a, b, c = (tmp_path / f"{k}.png" for k in "abc")
    sample.main(_sample_args(ckpt, a, "--seed", "7"))
    sample.main(_sample_args(ckpt, b, "--seed", "7"))
    sample.main(_sample_args(ckpt, c, "--seed", "8"))
    assert np.array_equal(_png(a), _png(b)) and not np.array_equal(_png(a), _png(c))


def test_compiled_matches_eager(ckpt, tmp_path, capsys):
    eager = sample.main(_sample_args(ckpt, tmp_path / "eager.png", "--num-sampling-steps", "3"))
    compiled = sample.main(_sample_args(ckpt, tmp_path / "compiled.png", "--num-sampling-steps", "3", "--compile"))
    assert "Compiled the sampling step" in capsys.readouterr().out and compiled["compile_seconds"] > 0
    torch.testing.assert_close(compiled["images"], eager["images"], atol=1e-3, rtol=1e-3)
    assert np.abs(_png(tmp_path / "eager.png").astype(int) - _png(tmp_path / "compiled.png")).max() <= 1


def test_latent_space_with_a_tiny_vae_directory(tmp_path):
    from tests.vae_helpers import save_tiny_vae  # downsample 2, 4 latent channels
    vae_dir = save_tiny_vae(tmp_path / "vae")
    latent_ckpt = save_tiny_checkpoint(tmp_path / "latent.pt", input_size=4, in_channels=4, num_classes=CLASSES)
    args = _sample_args(latent_ckpt, tmp_path / "g.png", "--precision", "bf16")
    args[args.index("--vae") + 1] = str(vae_dir)
    result = sample.main(args)
    assert result["images"].shape == (5, 3, SIZE, SIZE)


def test_clear_errors(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        sample.main(_sample_args(tmp_path / "missing.pt", tmp_path / "x.png"))
    with pytest.raises(ValueError, match="outside"):
        sample.main(_sample_args(ckpt, tmp_path / "x.png", "--class-labels", "3", str(CLASSES)))
    bad_size = _sample_args(ckpt, tmp_path / "x.png")
    bad_size[bad_size.index("--image-size") + 1] = "9"
    with pytest.raises(ValueError, match="divisible"):
        sample.main(bad_size)
    with pytest.raises(ValueError, match="--ckpt"):
        sample.main([*TINY_FLAGS, "--vae", "none", "--image-size", "8"])
    # As a script: one line on stderr, no traceback.
    proc = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(tmp_path / "missing.pt"),
                           "--image-size", "100"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert proc.returncode != 0 and "sample.py: error:" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------- sample_ddp.py
def _ddp_args(ckpt, sample_dir, *extra):
    return [*TINY_FLAGS, "--ckpt", str(ckpt), "--vae", "none", "--image-size", str(SIZE),
            "--num-classes", str(CLASSES), "--num-sampling-steps", "4", "--num-fid-samples", "10",
            "--per-proc-batch-size", "4", "--sample-dir", str(sample_dir), *extra]


def test_ddp_single_process_npz_and_resume(ckpt, tmp_path, monkeypatch):
    full = sample_ddp.main(_ddp_args(ckpt, tmp_path / "a", "--cfg-scale", "1.5"))
    assert full["folder"].name == "DiT-S-2-tiny-size-8-vae-none-cfg-1.5-seed-0"
    arr = np.load(full["npz"])["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (10, SIZE, SIZE, 3)
    assert len(list(full["folder"].glob("*.png"))) == 12  # 3 batches of 4, as the original
    assert np.array_equal(arr[3], _png(full["folder"] / "000003.png"))

    # A crash after 5 PNGs, then a rerun: the same images as the uninterrupted run.
    import dit_fast.sampling.resumable as resumable
    real_save, saved = resumable.save_png, []

    def crashing_save(array, path):
        if len(saved) == 5:
            raise KeyboardInterrupt("simulated crash")
        saved.append(path)
        real_save(array, path)
    monkeypatch.setattr(resumable, "save_png", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        sample_ddp.main(_ddp_args(ckpt, tmp_path / "b", "--cfg-scale", "1.5"))
    monkeypatch.setattr(resumable, "save_png", real_save)
    resumed = sample_ddp.main(_ddp_args(ckpt, tmp_path / "b", "--cfg-scale", "1.5"))
    assert np.array_equal(np.load(resumed["npz"])["arr_0"], arr)

    # Deleting PNGs resamples exactly those batches.
    for name in ("000001.png", "000009.png"):
        (resumed["folder"] / name).unlink()
    again = sample_ddp.main(_ddp_args(ckpt, tmp_path / "b", "--cfg-scale", "1.5"))
    assert np.array_equal(np.load(again["npz"])["arr_0"], arr)


def test_ddp_without_guidance_and_bad_settings(ckpt, tmp_path):
    out = sample_ddp.main(_ddp_args(ckpt, tmp_path, "--cfg-scale", "1.0", "--num-fid-samples", "3"))
    assert np.load(out["npz"])["arr_0"].shape == (3, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="other settings"):
        sample_ddp.main(_ddp_args(ckpt, tmp_path, "--cfg-scale", "1.0", "--per-proc-batch-size", "2"))
    with pytest.raises(ValueError, match="cfg-scale"):
        sample_ddp.main(_ddp_args(ckpt, tmp_path, "--cfg-scale", "0.5"))


def test_evaluate_writes_evaluate_py_metrics_beside_the_samples(ckpt, tmp_path, monkeypatch):
    """--evaluate runs after the .npz: the JSON beside it holds what evaluate.py computes from the same
    files (the real Inception architecture, random weights; a stand-in for the 2048-wide sqrtm)."""
    import json

    from dit_fast.evaluation import cli as evaluate
    from tests.evaluation_helpers import mean_distance, save_random_weights
    monkeypatch.setattr("dit_fast.evaluation.suite.frechet_distance", mean_distance)
    weights = save_random_weights(tmp_path / "inception.pth", seed=2)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8))
    out = sample_ddp.main(_ddp_args(ckpt, tmp_path / "s", "--num-fid-samples", "4", "--fid-ref", str(ref),
                                    "--inception-weights", str(weights)))  # --fid-ref: --evaluate's old name
    written = json.loads(out["npz"].with_name(out["npz"].stem + ".evaluation.json").read_text())
    assert written == json.loads(json.dumps(out["metrics"])) and out["fid"] == written["fid"]
    assert written["num_samples"] == 4 and written["samples"] == str(out["npz"])
    again = evaluate.main([str(ref), str(out["npz"]), "--inception-weights", str(weights),
                           "--json", str(tmp_path / "again.json")])
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert written[key] == again[key], key
    assert again["reference_features_cached"] is True  # sample_ddp's run cached the reference


@pytest.mark.slow
def _torchrun(ckpt, sample_dir, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "sample_ddp.py"), *_ddp_args(ckpt, sample_dir, "--per-proc-batch-size", "3")]
    # The script itself: ENV's PYTHONPATH makes it import this checkout's dit_fast.
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=sample_dir.parent,
                          timeout=300)


def test_torchrun_two_processes_and_a_signal_to_one_rank_stops_both(ckpt, tmp_path):
    """Two ranks under torchrun; then SIGTERM to rank 1 after its first batch: the ranks agree, both
    stop after that round (each says so; exit 75), and the rerun completes the set to the same .npz."""
    name = "DiT-S-2-tiny-size-8-vae-none-cfg-1.5-seed-0"
    (tmp_path / "a").mkdir()
    proc = _torchrun(ckpt, tmp_path / "a")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    folder = tmp_path / "a" / name
    arr = np.load(folder.with_name(folder.name + ".npz"))["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (10, SIZE, SIZE, 3)
    assert len(list(folder.glob("*.png"))) == 12  # ceil(10 / (2 x 3)) x 6

    (tmp_path / "b").mkdir()
    cut = _torchrun(ckpt, tmp_path / "b", {"DIT_FAST_FAULT": "term:sample.batch:0:1"})
    text = cut.stdout + cut.stderr
    assert cut.returncode != 0, text[-4000:]  # torchrun: a worker failed (its own traceback follows)
    assert "rank 1 stopped by SIGTERM between batches" in text, text[-4000:]
    assert "rank 0 stopped by a signal to another rank between batches" in text, text[-4000:]
    # torchrun's report: the first rank out exited 75; torchrun then SIGTERMs the other, which may
    # still be leaving (after its line above), so its code is 75 or -15.
    assert "exitcode  : 75" in text and "Root Cause" in text, text[-4000:]
    assert len(list((tmp_path / "b" / name).glob("*.png"))) == 6  # round 0 on both ranks, no more
    assert not (tmp_path / "b" / f"{name}.npz").exists()
    again = _torchrun(ckpt, tmp_path / "b")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert np.array_equal(np.load(tmp_path / "b" / f"{name}.npz")["arr_0"], arr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sample_cuda_compiled_cuda_graphs_match_eager(ckpt, tmp_path):
    eager = sample.main(_sample_args(ckpt, tmp_path / "e.png", "--device", "cuda", "--no-tf32"))
    compiled = sample.main(_sample_args(ckpt, tmp_path / "c.png", "--device", "cuda", "--no-tf32", "--compile"))
    torch.testing.assert_close(compiled["images"], eager["images"], atol=1e-3, rtol=1e-3)
    low = sample.main(_sample_args(ckpt, tmp_path / "b.png", "--device", "cuda", "--compile", "--precision", "bf16"))
    assert low["images"].dtype == torch.float32 and torch.isfinite(low["images"]).all()


def test_custom_size_grey_model_with_guide_all_channels(tmp_path):
    """A model trained with train.py --depth/--hidden-size/--num-heads samples through the same flags;
    with one channel, --guide-all-channels guides the noise only (the default also guides the variance)."""
    from dit_fast.models import DiT
    from dit_fast.sampling.grid import main

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts as the identity: make the output depend on y
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"ema": model.state_dict()}, tmp_path / "tiny.pt")
    common = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--vae", "none",
              "--image-size", "8", "--in-channels", "1", "--num-classes", "10", "--class-labels", "1", "7",
              "--num-sampling-steps", "3", "--ckpt", str(tmp_path / "tiny.pt")]
    guided = main(common + ["--guide-all-channels", "--out", str(tmp_path / "all.png")])
    default = main(common + ["--out", str(tmp_path / "three.png")])
    assert guided["path"].is_file() and guided["images"].shape == (2, 1, 8, 8)
    assert not torch.equal(guided["images"], default["images"])
