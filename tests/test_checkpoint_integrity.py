"""Checkpoints that are damaged, written to a full disk, or would not fit -- without a training run:

- manifest.json (size + CRC-32 per file) catches a truncated and a byte-flipped file; --resume auto
  skips the damaged newest checkpoint with a warning naming the file, --resume PATH refuses it, and
  a checkpoint without a manifest (older dit_fast) is accepted with a note;
- `python -m dit_fast.train.verify` prints one line per checkpoint, exit 0 / 1 / 2;
- a torch.save past RLIMIT_FSIZE is the OSError "File too large" (torch's own writer drops the errno);
- the pre-flight estimate refuses a results filesystem that cannot hold one checkpoint.
"""
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from dit_fast.config import Config
from dit_fast.train.integrity import verify_checkpoint, write_manifest
from dit_fast.train.resume import resolve_resume
from dit_fast.checkpoint.run_files import TRAIN_STATE
from dit_fast.train.verify import main as verify_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"model": "DiT-S/2"}, "train": {"global_batch_size": 8}}


def make_ckpt(run: Path, step: int, manifest: bool = True) -> Path:
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    (ckpt / "ds").mkdir(parents=True)
    torch.save({"step": step, "config": CONFIG}, ckpt / TRAIN_STATE)
    torch.save({"w": torch.arange(1000.0) + step}, ckpt / "ds" / "shard.pt")
    if manifest:
        write_manifest(ckpt, {})
    return ckpt


def flip_byte(path: Path, at: int = 500) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_catches_truncation_and_flipped_bytes(tmp_path):
    ckpt = make_ckpt(tmp_path / "run", 2)
    assert verify_checkpoint(ckpt) == ([], None)
    shard = ckpt / "ds" / "shard.pt"
    flip_byte(shard)
    problems, _ = verify_checkpoint(ckpt)
    assert len(problems) == 1 and "shard.pt: contents changed" in problems[0]
    assert verify_checkpoint(ckpt, checksums=False) == ([], None)  # same size: only the sum sees it
    shard.write_bytes(shard.read_bytes()[:100])
    assert "shard.pt: truncated, 100 bytes instead of" in verify_checkpoint(ckpt, checksums=False)[0][0]
    shard.unlink()
    assert verify_checkpoint(ckpt)[0][0].endswith("shard.pt: missing")


def test_auto_resume_skips_a_damaged_checkpoint_explicit_refuses(tmp_path):
    old = make_ckpt(tmp_path / "000-run", 2)
    new = make_ckpt(tmp_path / "000-run", 4)
    flip_byte(new / "ds" / "shard.pt")
    choice = resolve_resume("auto", str(tmp_path), CONFIG)
    assert choice.path == old
    warning = next(n for n in choice.notes if n.startswith("WARNING"))
    assert f"skipping damaged checkpoint {new}: {new / 'ds' / 'shard.pt'}: contents changed" in warning
    with pytest.raises(ValueError, match=r"is damaged: .*shard.pt: contents changed.*--resume auto"):
        resolve_resume(str(new), str(tmp_path), CONFIG)
    assert resolve_resume(str(old), str(tmp_path), CONFIG).path == old


def test_checkpoint_without_manifest_is_accepted_with_a_note(tmp_path):
    legacy = make_ckpt(tmp_path / "000-run", 6, manifest=False)
    choice = resolve_resume("auto", str(tmp_path), CONFIG)
    assert choice.path == legacy
    assert any("has no manifest.json" in n and "not verified" in n for n in choice.notes)


def test_verify_cli_one_line_per_checkpoint(tmp_path, capsys):
    run = tmp_path / "000-run"
    make_ckpt(run, 2), make_ckpt(run, 4, manifest=False)
    assert verify_main([str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"ok {run / 'checkpoints' / 'step-0000002'} (") and \
        out[1].startswith("unverified ") and len(out) == 2
    flip_byte(run / "checkpoints" / "step-0000002" / TRAIN_STATE, 50)
    assert verify_main([str(run / "checkpoints" / "step-0000002")]) == 1
    assert capsys.readouterr().out.startswith("DAMAGED ")
    proc = subprocess.run([sys.executable, "-m", "dit_fast.train.verify", str(tmp_path / "nothing")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "neither a run directory" in proc.stderr


def test_save_past_the_file_size_limit_is_file_too_large(tmp_path):
    """In a child whose RLIMIT_FSIZE is 100 kB: torch.save to a path loses the errno, our save
    keeps it; the bytes written below the limit are checksummed as written."""
    code = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from dit_fast.train.save_io import save_file\n"
        "p = Path(sys.argv[1])\n"
        "print(save_file({'a': torch.zeros(10)}, p / 'small.pt'))\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n    torch.save(torch.zeros(100_000), p / 'plain.pt')\n"
        "except RuntimeError as e:\n    print('torch:', type(e).__name__, 'inline_container' in str(e))\n"
        "try:\n    save_file(torch.zeros(100_000), p / 'big.pt')\n"
        "except OSError as e:\n    print('ours:', e.errno, e.strerror)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert lines[1:] == ["torch: RuntimeError True", "ours: 27 File too large"], proc.stdout + proc.stderr
    size, crc = eval(lines[0])
    data = (tmp_path / "small.pt").read_bytes()
    assert (size, crc) == (len(data), zlib.crc32(data))


def test_disk_check_refuses_a_filesystem_that_cannot_hold_one_checkpoint(tmp_path, monkeypatch):
    import shutil

    from dit_fast.train import disk
    cfg = Config()  # DiT-XL/2 at 256 px: 32x32x4 latents
    cfg.model.in_channels, cfg.model.input_size = 4, 32
    cfg.train.results_dir = str(tmp_path / "results")
    need = disk.estimate_checkpoint_bytes(cfg, zero_stage=2)
    assert 12.0e9 < need < 12.4e9  # 675 M params x (2 bf16 + 4 master + 8 Adam + 4 EMA)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need - 1))
    with pytest.raises(ValueError, match=r"one checkpoint needs about 12\.\d\d GB.*--ignore-disk-check"):
        disk.check_disk_space(cfg, 2)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need + 1))
    assert "fewer than the 3 checkpoints" in disk.check_disk_space(cfg, 2)
    cfg.train.ignore_disk_check = True
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=0))
    assert disk.check_disk_space(cfg, 2) is None
    assert not (tmp_path / "results").exists()
