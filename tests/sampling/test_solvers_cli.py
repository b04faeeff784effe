"""--sampler in sample.py / sample_ddp.py, and the export CLI's one-line errors (CPU, tiny random DiT)."""
import numpy as np
import pytest
import torch

from dit_fast.sampling import grid as sample
from dit_fast.sampling import fid_set as sample_ddp
from tests.sampling_helpers import TINY_FLAGS, save_tiny_checkpoint

pytest.importorskip("diffusers")
SIZE, CLASSES = 8, 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", input_size=SIZE,
                                in_channels=3, num_classes=CLASSES)


def _args(ckpt, *extra):
    return [*TINY_FLAGS, "--ckpt", str(ckpt), "--vae", "none", "--image-size", str(SIZE),
            "--num-classes", str(CLASSES), "--num-sampling-steps", "3", *extra]


@pytest.mark.parametrize("name", ["dpm-solver++", "unipc", "euler", "heun"])
def test_sample_py_runs_every_solver(ckpt, tmp_path, name, capsys):
    result = sample.main(_args(ckpt, "--sampler", name, "--class-labels", "1", "2", "--out",
                               str(tmp_path / "grid.png")))
    assert result["images"].shape == (2, 3, SIZE, SIZE) and torch.isfinite(result["images"]).all()
    assert f"sample.sampler = '{name}'" in capsys.readouterr().out


def test_sample_py_solver_compiled_matches_eager(ckpt, tmp_path):
    common = ("--sampler", "dpm-solver++", "--class-labels", "3", "4")
    eager = sample.main(_args(ckpt, *common, "--out", str(tmp_path / "eager.png")))
    compiled = sample.main(_args(ckpt, *common, "--compile", "--out", str(tmp_path / "compiled.png")))
    assert compiled["compile_seconds"] > 0
    torch.testing.assert_close(compiled["images"], eager["images"], atol=1e-3, rtol=1e-3)


def test_sample_ddp_with_a_solver(ckpt, tmp_path):
    result = sample_ddp.main(_args(ckpt, "--sampler", "unipc", "--sample-dir", str(tmp_path),
                                   "--num-fid-samples", "3", "--per-proc-batch-size", "2"))
    assert np.load(result["npz"])["arr_0"].shape == (3, SIZE, SIZE, 3)


def test_unknown_sampler_lists_the_choices(ckpt, capsys):
    with pytest.raises(SystemExit):
        sample.main(_args(ckpt, "--sampler", "dpm"))
    assert "dpm-solver++" in capsys.readouterr().err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our checkpoint, its diffusers export): the tiny DiT with its fixed sin-cos table intact."""
    from dit_fast.checkpoint.export import main as export
    from tests.sampling_helpers import build_tiny

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_tiny(input_size=SIZE, in_channels=3, num_classes=CLASSES)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.1)
    ours = root / "ours.pt"
    torch.save(model.state_dict(), ours)
    flags = [*TINY_FLAGS, "--vae", "none", "--image-size", str(SIZE), "--num-classes", str(CLASSES)]
    export(["--ckpt", str(ours), "--out", str(root / "pipe"), *flags])
    return ours, root / "pipe"


def test_sample_py_takes_a_diffusers_transformer_folder(exported, tmp_path):
    ours, pipe = exported
    common = ("--sampler", "dpm-solver++", "--class-labels", "1", "5")
    ref = sample.main(_args(ours, *common, "--out", str(tmp_path / "ours.png")))
    for ckpt in (pipe / "transformer", pipe, pipe / "transformer" / "diffusion_pytorch_model.safetensors"):
        got = sample.main(_args(ckpt, *common, "--out", str(tmp_path / "theirs.png")))
        assert torch.equal(got["images"], ref["images"]), ckpt


def test_diffusers_config_that_does_not_fit_the_flags_is_one_line(exported, tmp_path, capsys):
    _, pipe = exported
    argv = _args(pipe / "transformer", "--out", str(tmp_path / "x.png")) + ["--num-classes", "12",
                                                                             "--class-labels", "1"]
    with pytest.raises(SystemExit) as stop:
        sample.cli(argv)
    assert stop.value.code == 2  # bad input (dit_fast.cli): one line on stderr
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_embeds_ada_norm=10 (the model built from --num-classes has 12)" in err[0]


def test_demo_samples_with_a_solver():
    import argparse

    from dit_fast.demo import sample_digits
    from tests.sampling_helpers import build_tiny

    model = build_tiny(input_size=SIZE, in_channels=1, num_classes=CLASSES).eval()
    args = argparse.Namespace(seed=0, samples_per_class=1, image_size=SIZE, num_sampling_steps=2,
                              cfg_scale=3.0, sampler="heun")
    samples, labels = sample_digits(model, args, torch.device("cpu"))
    assert samples.shape == (10, 1, SIZE, SIZE) and labels.tolist() == list(range(10))
