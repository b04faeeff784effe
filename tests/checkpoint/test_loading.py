"""dit_fast.checkpoint.loading: every source load_state_dict reads (training checkpoints, safetensors,
wrapped keys, run and step directories), and strict fitting into a model."""
import argparse
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from dit_fast.checkpoint import (CheckpointError, atomic_save, load_into_model, load_state_dict,
                                 safe_torch_load)
from tests.checkpoint.tiny_weights import Tiny, assert_same, tiny_state


def test_dit_training_checkpoint_with_args(tmp_path):
    model, ema = tiny_state(0), tiny_state(1)
    opt = torch.optim.AdamW(Tiny().parameters()).state_dict()
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000)
    path = tmp_path / "0050000.pt"
    torch.save({"model": model, "ema": ema, "opt": opt, "args": args}, path)
    raw = safe_torch_load(path)
    assert raw["args"] == args  # the Namespace survives, as DiT's sample.py expects
    assert_same(load_state_dict(path), ema)
    assert_same(load_state_dict(path, prefer_ema=False), model)


def test_own_training_checkpoint_with_rng_state(tmp_path):
    state = {
        "model": tiny_state(), "step": 7, "config": {"model": {"depth": 2}},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": __import__("random").getstate()},
    }
    atomic_save(state, tmp_path / "own.pt")
    raw = safe_torch_load(tmp_path / "own.pt")
    np.random.set_state(raw["rng"]["numpy"])
    assert raw["step"] == 7
    assert_same(load_state_dict(tmp_path / "own.pt"), state["model"])


def test_safetensors_roundtrip(tmp_path):
    state = tiny_state()
    atomic_save(state, tmp_path / "w.safetensors")
    assert_same(load_state_dict(tmp_path / "w.safetensors"), state)
    with pytest.raises(TypeError, match="flat"):
        atomic_save({"step": 1}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_prefixes_are_stripped(tmp_path):
    state = tiny_state()
    wrapped = OrderedDict()
    for i, (k, v) in enumerate(state.items()):
        prefix = ["module.", "_orig_mod.", "module._orig_mod."][i % 3]
        wrapped[prefix + k.replace("blocks.1.", "blocks.1._orig_mod.")] = v
    torch.save({"module": wrapped}, tmp_path / "ds.pt")
    assert_same(load_state_dict(tmp_path / "ds.pt"), state)


def test_missing_and_not_a_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="official names"):
        load_state_dict(tmp_path / "nope.pt")
    torch.save({"step": 3, "notes": "x"}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="top-level keys are: notes, step"):
        load_state_dict(tmp_path / "odd.pt")


# --------------------------------------------------------------------------- fitting

def test_load_into_model_strict_and_compiled_names():
    src = Tiny()
    dst = Tiny()
    load_into_model(dst, src.state_dict())
    assert_same(dst.state_dict(), src.state_dict())
    # A wrapped target (as torch.compile's OptimizedModule names it) still loads a plain checkpoint.
    holder = nn.Module()
    holder._orig_mod = Tiny()
    load_into_model(holder, src.state_dict())
    torch.testing.assert_close(holder._orig_mod.x_embedder.weight, src.x_embedder.weight)


def test_mismatch_is_one_clear_message():
    state = Tiny(width=4).state_dict()
    del state["blocks.1.bias"]
    state["y_embedder.embedding_table.weight"] = torch.zeros(3, 4)
    model = Tiny(width=6)
    before = model.x_embedder.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_into_model(model, state)
    msg = str(info.value)
    assert "1 missing, 1 unexpected and 6 wrong-shape keys" in msg
    assert "missing (1): blocks.1.bias" in msg
    assert "unexpected (1): y_embedder.embedding_table.weight" in msg
    assert "x_embedder.weight: checkpoint (4, 3) vs model (6, 3)" in msg
    assert "--model" in msg and "--image-size" in msg
    torch.testing.assert_close(model.x_embedder.weight, before)  # nothing half-loaded


def test_mismatch_message_is_truncated():
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(200)])
    with pytest.raises(CheckpointError) as info:
        load_into_model(big, {})
    msg = str(info.value)
    assert "400 missing" in msg and "and 388 more" in msg and len(msg) < 2000


# --------------------------------------------------------------------------- with the real DiT

def _small_dit(**kwargs):
    from dit_fast.models import DiT
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=4, hidden_size=48, depth=2, num_heads=2,
                      **kwargs).eval()  # eval: no random label dropout


def test_dit_training_checkpoint_roundtrip(tmp_path):
    src = _small_dit(num_classes=10)
    with torch.no_grad():  # adaLN-Zero starts at zero: perturb so the outputs test something
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    atomic_save({"model": wrapped, "ema": src.state_dict(), "args": argparse.Namespace(a=1)},
                tmp_path / "0000010.pt")
    dst = load_into_model(_small_dit(num_classes=10), load_state_dict(tmp_path / "0000010.pt"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([3, 7])
    torch.testing.assert_close(dst(x, t, y), src(x, t, y), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"y_embedder.embedding_table.weight: checkpoint "
                                              r"\(11, 48\) vs model \(1001, 48\)"):
        load_into_model(_small_dit(), src.state_dict())


# --------------------------------------------------------------------------- training run directories

def _step(run, step, state, complete=True):
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    ckpt.mkdir(parents=True)
    atomic_save({"ema": state}, ckpt / f"ema-{step:07d}.pt")
    if complete:
        atomic_save({"step": step}, ckpt / "train_state.pt")
    return ckpt


def test_run_and_step_directories_load_their_ema(tmp_path):
    run = tmp_path / "000-DiT-S-2"
    first = _step(run, 100, tiny_state(1))
    _step(run, 200, tiny_state(2))
    _step(run, 300, tiny_state(3), complete=False)  # an unfinished save is never chosen
    assert_same(load_state_dict(run), tiny_state(2))
    assert_same(load_state_dict(first), tiny_state(1))
    assert_same(load_state_dict(first / "ema-0000100.pt"), tiny_state(1))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_state_dict(_step(tmp_path / "fresh", 5, tiny_state(), complete=False).parent.parent)
    (first / "ema-0000100.pt").unlink()
    with pytest.raises(FileNotFoundError, match="without its EMA weights"):
        load_state_dict(first)
