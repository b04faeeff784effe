"""--sampler in sample.py / sample_ddp.py, and the export CLI's one-line errors (CPU, tiny random DiT)."""
import numpy as np
import pytest
import torch

import sample
import sample_ddp
from tests.sampling_helpers import TINY_FLAGS, save_tiny_checkpoint

pytest.importorskip("diffusers")
SIZE, CLASSES = 8, 10


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
