"""Sampling reads the run: --ckpt as a train.py run dir, a checkpoints/step-NNNNNNN dir or the EMA file in
one gives, with no model flag, the same images as the same weights with today's explicit flags; a model
flag that contradicts the run's saved config is one line and exit 2; speed flags may differ."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast.checkpoint import atomic_save
from dit_fast.config import Config, ModelConfig, config_to_dict, save_config
from dit_fast.sampling import fid_set, grid
from dit_fast.sampling.run_source import resolve_ckpt
from dit_fast.train.run_dir import TRAIN_STATE, ema_file_name, step_dir_name
from tests.sampling_helpers import TINY_FLAGS, TINY_MODEL, TINY_SIZE, save_tiny_checkpoint

SIZE, CLASSES = 8, 10
EXPLICIT = [*TINY_FLAGS, "--vae", "none", "--image-size", str(SIZE), "--num-classes", str(CLASSES)]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run_dir(root, steps=(5, 10), objective="diffusion"):
    """A run directory in train.py's layout (config.json; per step train_state.pt with the resolved
    config and the EMA file; an unfinished .tmp step that must be ignored). Returns (run, newest EMA)."""
    model = ModelConfig(model=TINY_MODEL, image_size=SIZE, num_classes=CLASSES, in_channels=3,
                        input_size=SIZE, **TINY_SIZE)
    cfg = Config(model=model)
    cfg.train.objective = objective
    cfg.data.vae, cfg.data.features_path = "none", "digits"
    run = root / "003-DiT-S-2"
    save_config(cfg, run / "config.json")
    for i, step in enumerate(steps):
        folder = run / "checkpoints" / step_dir_name(step)
        folder.mkdir(parents=True)
        weights = save_tiny_checkpoint(root / f"w{step}.pt", input_size=SIZE, num_classes=CLASSES, seed=i)
        atomic_save({"ema": torch.load(weights, weights_only=True)}, folder / ema_file_name(step))
        atomic_save({"step": step, "config": config_to_dict(cfg)}, folder / TRAIN_STATE)
    (run / "checkpoints" / (step_dir_name(99) + ".tmp")).mkdir()
    return run, run / "checkpoints" / step_dir_name(steps[-1]) / ema_file_name(steps[-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run_dir(tmp_path_factory.mktemp("results"))


def _grid(ckpt, out, *flags):
    common = ["--num-sampling-steps", "4", "--class-labels", "1", "2", "3", "--seed", "2", "--out", str(out)]
    return np.asarray(Image.open(grid.main([*flags, "--ckpt", str(ckpt), *common])["path"]))


def test_run_dir_step_dir_and_ema_file_sample_like_explicit_flags(run, tmp_path):
    run_dir, ema = run
    plain = tmp_path / "plain.pt"
    shutil.copy(ema, plain)  # the same weights outside any run: today's flags say what the model is
    ref = _grid(plain, tmp_path / "ref.png", *EXPLICIT)
    for name, ckpt in (("run", run_dir), ("step", ema.parent), ("ema", ema)):
        assert np.array_equal(_grid(ckpt, tmp_path / f"{name}.png"), ref), name
    # The newest complete checkpoint is the one sampled: an older one gives other images.
    older = run_dir / "checkpoints" / step_dir_name(5)
    assert not np.array_equal(_grid(older, tmp_path / "older.png"), ref)
    # Model flags that agree with the run, and speed flags, are fine.
    assert np.array_equal(_grid(run_dir, tmp_path / "same.png", "--model", TINY_MODEL, "--image-size",
                                str(SIZE), "--attn-backend", "math"), ref)


def test_sample_ddp_reads_the_run(run, tmp_path):
    run_dir, ema = run
    plain = tmp_path / "plain.pt"
    shutil.copy(ema, plain)
    common = ["--num-sampling-steps", "3", "--num-fid-samples", "4", "--per-proc-batch-size", "2"]
    ref = fid_set.main([*EXPLICIT, "--ckpt", str(plain), "--sample-dir", str(tmp_path / "a"), *common])
    ours = fid_set.main(["--ckpt", str(run_dir), "--sample-dir", str(tmp_path / "b"), *common])
    assert np.array_equal(np.load(ours["npz"])["arr_0"], np.load(ref["npz"])["arr_0"])


@pytest.mark.parametrize("flag,value", [("--model", "DiT-B/2"), ("--image-size", "16"),
                                        ("--num-classes", "7"), ("--vae", "ema"), ("--depth", "3")])
def test_contradicting_model_flag_is_one_line_exit_2(run, tmp_path, capsys, flag, value):
    run_dir, _ = run
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as exit_info:
        grid.cli(["--ckpt", str(run_dir), flag, value, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert f"{flag} {value} contradicts" in err and "saved config" in err
    with pytest.raises(SystemExit) as exit_info:
        fid_set.cli(["--ckpt", str(run_dir), flag, value, "--sample-dir", str(tmp_path / "s")])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
    from dit_fast.checkpoint.export import cli as export
    code = export(["--ckpt", str(run_dir), flag, value, "--out", str(tmp_path / "pipe"), "--no-check"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "pipe").exists(), err
    assert f"{flag} {value} contradicts" in err


def test_resolve_ckpt_kinds(run, tmp_path):
    run_dir, ema = run
    assert resolve_ckpt(str(run_dir)).weights == ema and resolve_ckpt(str(run_dir)).config.model.depth == 2
    assert resolve_ckpt(str(ema)).config is not None
    plain = resolve_ckpt(str(save_tiny_checkpoint(tmp_path / "p.pt", input_size=SIZE)))
    assert plain.config is None
    empty = tmp_path / "004-empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_ckpt(str(empty))


def test_export_reads_the_run_like_explicit_flags(tmp_path):
    """The export resolves --ckpt through the same run_source: a run dir needs no model flag."""
    pytest.importorskip("diffusers")
    from dit_fast.checkpoint.export import main as export
    from tests.sampling_helpers import build_tiny
    run_dir, ema = _run_dir(tmp_path / "results", steps=(7,))
    torch.manual_seed(0)
    model = build_tiny(input_size=SIZE, in_channels=3, num_classes=CLASSES)
    with torch.no_grad():  # keep the fixed sin-cos table: the export checks diffusers can recompute it
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.1)
    atomic_save({"ema": model.state_dict()}, ema)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    export(["--ckpt", str(plain), "--out", str(tmp_path / "a"), "--no-check", *EXPLICIT])
    export(["--ckpt", str(run_dir), "--out", str(tmp_path / "b"), "--no-check"])
    for name in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "model_index.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
