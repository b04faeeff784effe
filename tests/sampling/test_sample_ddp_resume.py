"""sample_ddp.py never mixes two sets of images in one folder: the folder's sample_ddp.json records
the checkpoint's identity (path, size, mtime, sha256 of its first MiB) and every flag that changes
the pixels; a rerun that differs in any of them refuses, listing the differences."""
import pytest

from dit_fast.sampling import fid_set as sample_ddp
from tests.sampling_helpers import save_tiny_checkpoint
from tests.sampling.test_sample_cli import CLASSES, SIZE, _ddp_args


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rerun_with_another_checkpoint_or_flag_refuses(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    ckpt = save_tiny_checkpoint(tmp_path / "a" / "tiny.pt", input_size=SIZE, in_channels=3,
                                num_classes=CLASSES, seed=0)
    out = tmp_path / "samples"
    first = sample_ddp.main(_ddp_args(ckpt, out, "--num-fid-samples", "4"))
    pngs = sorted(p.name for p in first["folder"].glob("*.png"))

    # Same basename (so the same folder name), other weights: the identity differs.
    other = save_tiny_checkpoint(tmp_path / "b" / "tiny.pt", input_size=SIZE, in_channels=3,
                                 num_classes=CLASSES, seed=1)
    with pytest.raises(ValueError, match="other settings.*checkpoint: before"):
        sample_ddp.main(_ddp_args(other, out, "--num-fid-samples", "4"))
    for flag in (["--guide-all-channels"], ["--precision", "bf16"], ["--no-tf32"],
                 ["--attn-backend", "math"]):
        with pytest.raises(ValueError, match="other settings"):
            sample_ddp.main(_ddp_args(ckpt, out, "--num-fid-samples", "4", *flag))
    assert sorted(p.name for p in first["folder"].glob("*.png")) == pngs  # nothing resampled
    again = sample_ddp.main(_ddp_args(ckpt, out, "--num-fid-samples", "4"))  # same: resumes
    assert again["folder"] == first["folder"]


def test_model_without_null_label_refuses_guidance_but_samples_without(tmp_path):
    import torch

    from dit_fast.diffusion import create_diffusion
    from dit_fast.sampling import build_sampler
    from tests.sampling_helpers import build_tiny
    model = build_tiny(input_size=SIZE, num_classes=CLASSES, in_channels=3, class_dropout_prob=0.0).eval()
    with pytest.raises(ValueError, match="no null label"):
        build_sampler(model, create_diffusion("2"), cfg_scale=4.0, num_classes=CLASSES, use_cfg=True)
    # Through the CLI: the checkpoint's label table has no null row; --cfg-scale 1 still works.
    ckpt = tmp_path / "no_null.pt"
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(ValueError, match="no null label"):
        sample_ddp.main(_ddp_args(ckpt, tmp_path / "s", "--cfg-scale", "4", "--num-fid-samples", "2"))
    out = sample_ddp.main(_ddp_args(ckpt, tmp_path / "s", "--cfg-scale", "1", "--num-fid-samples", "2"))
    assert out["npz"] is not None


def test_signal_stops_between_batches_and_the_rerun_completes_the_set(tmp_path, monkeypatch):
    """SIGINT (Ctrl-C) while the first batch is written: that batch's PNGs complete, no .npz, Preempted
    (exit 75 from the CLI); the rerun samples the rest, and the .npz equals an uninterrupted run's."""
    import os
    import signal

    import numpy as np

    from dit_fast.preempt import Preempted
    from dit_fast.sampling import resumable  # the batches loop writes the PNGs
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt", input_size=SIZE, in_channels=3,
                                num_classes=CLASSES, seed=0)
    whole = sample_ddp.main(_ddp_args(ckpt, tmp_path / "whole"))
    real_save = resumable.save_png
    written = []

    def save_then_signal(image, path):
        real_save(image, path)
        written.append(path)
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    monkeypatch.setattr(resumable, "save_png", save_then_signal)
    with pytest.raises(Preempted, match="stopped by SIGINT between batches"):
        sample_ddp.main(_ddp_args(ckpt, tmp_path / "cut"))
    folder = tmp_path / "cut" / whole["folder"].name
    assert len(list(folder.glob("*.png"))) == 4 and not list(folder.parent.glob("*.npz"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back
    monkeypatch.setattr(resumable, "save_png", real_save)
    again = sample_ddp.main(_ddp_args(ckpt, tmp_path / "cut"))
    assert np.array_equal(np.load(again["npz"])["arr_0"], np.load(whole["npz"])["arr_0"])
