"""sample.py / sample_ddp.py on flow models: a flow run dir samples with no flag (its saved config says
objective flow), the same as the same weights as a plain file (SiT's layout: DiT's keys, learned sigma)
with --objective flow; both equal dit_fast.transport's Sampler called directly on
drop_learned_sigma(forward_with_cfg), SiT's sample.py recipe. SiT's flags reach the sampler."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.sampling import fid_set, grid
from dit_fast.sampling.flags import build_sampling_model
from dit_fast.config import ModelConfig
from dit_fast.transport import Sampler as TransportSampler
from dit_fast.transport import create_transport, drop_learned_sigma
from tests.sampling.test_run_source import CLASSES, EXPLICIT, SIZE, _run_dir
from tests.sampling_helpers import TINY_MODEL, TINY_SIZE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABELS = [1, 2, 3]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    return _run_dir(tmp_path_factory.mktemp("flow"), steps=(4,), objective="flow")


def _grid(ckpt, out, *flags):
    common = ["--num-sampling-steps", "5", "--class-labels", *map(str, LABELS), "--seed", "2", "--out", str(out)]
    result = grid.main([*flags, "--ckpt", str(ckpt), *common])
    return np.asarray(Image.open(result["path"])), result["images"]


def _sit_sample_py(weights, cfg_scale=4.0, **ode):
    """SiT's sample.py with our model: seed, model, z; [z, z] / [y, null]; forward_with_cfg; half."""
    torch.manual_seed(2)
    m = ModelConfig(model=TINY_MODEL, image_size=SIZE, num_classes=CLASSES, in_channels=3, input_size=SIZE,
                    **TINY_SIZE)
    model = build_sampling_model(m, weights, torch.device("cpu"))
    z = torch.randn(len(LABELS), 3, SIZE, SIZE)
    y = torch.tensor(LABELS)
    fn = TransportSampler(create_transport()).sample_ode(**ode)
    out = fn(torch.cat([z, z]), drop_learned_sigma(model.forward_with_cfg), y=torch.cat([y, torch.full_like(y, 10)]),
             cfg_scale=cfg_scale)[-1]
    return out.chunk(2)[0]


def test_flow_run_samples_without_flags_like_sit(flow_run, tmp_path):
    run_dir, ema = flow_run
    plain = tmp_path / "SiT-tiny.pt"
    shutil.copy(ema, plain)  # {"ema": state}: what SiT's find_model reads too
    png, images = _grid(run_dir, tmp_path / "run.png", "--sampling-method", "euler")
    png_plain, images_plain = _grid(plain, tmp_path / "plain.png", *EXPLICIT, "--objective", "flow",
                                    "--sampling-method", "euler")
    assert np.array_equal(png, png_plain)
    assert torch.equal(images, _sit_sample_py(plain, sampling_method="euler", num_steps=5))
    # SiT's flags reach the sampler: another solver, the SDE and an interval give other images.
    for flags in (["--sampling-method", "heun"], ["--mode", "SDE"], ["--cfg-interval", "0.5", "1"]):
        other, _ = _grid(run_dir, tmp_path / "other.png", *flags)
        assert not np.array_equal(other, png), flags


def test_sample_ddp_on_a_flow_run_records_the_flow_settings(flow_run, tmp_path):
    import json
    run_dir, _ = flow_run
    args = ["--ckpt", str(run_dir), "--num-sampling-steps", "3", "--per-proc-batch-size", "2",
            "--num-fid-samples", "2", "--sample-dir", str(tmp_path), "--mode", "SDE", "--cfg-scale", "2"]
    result = fid_set.main(args)
    settings = json.loads((result["folder"] / "sample_ddp.json").read_text())
    assert settings["objective"] == "flow" and settings["mode"] == "SDE"
    assert settings["diffusion_form"] == "sigma" and settings["transport"]["path_type"] == "Linear"
    with pytest.raises(ValueError, match="other settings"):  # same folder, other SDE settings
        fid_set.main([*args, "--diffusion-form", "constant"])


def test_export_refuses_a_flow_run(flow_run, tmp_path):
    from dit_fast.checkpoint.export import main as export
    with pytest.raises(ValueError, match="flow run"):
        export(["--ckpt", str(flow_run[0]), "--out", str(tmp_path / "pipe")])
    assert not (tmp_path / "pipe").exists()


@pytest.mark.parametrize("flags, match", [(["--objective", "diffusion"], "--objective diffusion contradicts"),
                                          (["--path-type", "GVP"], "--path-type GVP contradicts"),
                                          (["--sampler", "ddim"], "is a diffusion sampler")])
def test_flags_that_contradict_a_flow_run_are_refused(flow_run, tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        _grid(flow_run[0], tmp_path / "x.png", *flags)
    assert not (tmp_path / "x.png").exists()
