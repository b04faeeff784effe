"""dit_fast.checkpoint.safe_io. A weights / EMA file with a malicious pickle is refused on every path
that loads one, before its payload runs (the payload would create a file: the file must not exist
afterwards); a file that is merely broken is named as such (empty, truncated, not a checkpoint), not as
unsafe; atomic_save leaves the old file or the complete new one."""
import os
import re
from pathlib import Path

import pytest
import torch

from dit_fast.checkpoint import (CheckpointError, UnsafeCheckpointError, atomic_save, load_state_dict,
                                 safe_torch_load)
from tests.checkpoint.tiny_weights import tiny_state


class Payload:
    """Unpickling this runs os.system: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """(path of an EMA-style file whose pickle creates ``marker``, marker)."""
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "ema-0000001.pt"
    torch.save({"ema": {"pos_embed": torch.zeros(1)}, "extra": Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_load_state_dict_refuses_a_malicious_pickle(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
        load_state_dict(str(path))
    assert not marker.exists()


def test_resume_ema_load_refuses_a_malicious_pickle(evil, tmp_path):
    from dit_fast.train.run_dir import FORMAT_VERSION, TRAIN_STATE, load_training_checkpoint
    path, marker = evil
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "epoch": 0, "step_in_epoch": 1, "world_size": 1, "version": FORMAT_VERSION,
                "config": {"model": {}}}, ckpt / TRAIN_STATE)
    path.rename(ckpt / path.name)

    class Engine:  # DeepSpeed's side of the load is not under test here
        def load_checkpoint(self, *args, **kwargs):
            return str(ckpt), {}

    with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
        load_training_checkpoint(Engine(), ckpt, rank=0, world_size=1, model_config={})
    assert not marker.exists()


def test_sample_py_refuses_a_malicious_ckpt(evil, tmp_path):
    import subprocess
    import sys
    path, marker = evil
    argv = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
            "--vae", "none", "--image-size", "8", "--num-classes", "10", "--in-channels", "1",
            "--class-labels", "0", "--num-sampling-steps", "2", "--device", "cpu",
            "--ckpt", str(path), "--out", str(tmp_path / "grid.png")]
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "sample.py"), *argv], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{repo}:{repo / 'kernels'}"})
    assert out.returncode == 2 and "Refusing to load" in out.stderr, out.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("content, says", [
    (b"", "it is empty"),
    (b"plain text, no checkpoint" * 3, "not a torch checkpoint"),
    ("truncate", "damaged or truncated torch (zip) checkpoint"),
])
def test_broken_files_name_the_real_cause(tmp_path, content, says):
    path = tmp_path / "broken.pt"
    if content == "truncate":
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(says)) as err:
        safe_torch_load(path)
    assert not isinstance(err.value, UnsafeCheckpointError)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(1), "payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="arbitrary Python objects") as info:
        load_state_dict(tmp_path / "evil.pt")
    assert "NOT loaded" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()  # the payload never ran


def test_not_a_checkpoint_is_clear(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="Could not read .*junk.pt: it is not a torch checkpoint"):
        load_state_dict(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="Could not read .*junk.safetensors"):
        load_state_dict(tmp_path / "junk.safetensors")


# --------------------------------------------------------------------------- saving

def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": tiny_state(0)}, path)
    old = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"model": tiny_state(1)}, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # temp file removed


def test_atomic_save_replaces_and_creates_dirs(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "0000100.pt"
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2}, path)
    assert safe_torch_load(path) == {"step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["0000100.pt"]
