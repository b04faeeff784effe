"""GPU tier of the trainer (skipped without CUDA): fp16 dynamic loss scaling with skipped-step
counting, and bf16 ZeRO-2 with torch.compile + activation checkpointing, through plain python."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "DiT-S/2", "--depth", "2", "--hidden-size", "64", "--num-heads", "4",
        "--image-size", "8", "--num-classes", "10", "--vae", "none", "--num-workers", "0",
        "--global-batch-size", "32", "--log-every", "1"]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    from dit_fast.data import write_digits_features
    return write_digits_features(tmp_path_factory.mktemp("digits") / "feat8", 8)


def run_plain(args, timeout=420):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "train.py", *TINY, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def metrics(results: Path) -> list[dict]:
    (run,) = list(results.iterdir())
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fp16_dynamic_loss_scale_and_skipped_steps_logged(tmp_path, digits8):
    run_plain(["--features-path", str(digits8), "--results-dir", str(tmp_path), "--precision",
               "fp16", "--deepspeed_config", str(ROOT / "configs/deepspeed/zero2.json"),
               "--max-steps", "4", "--ckpt-every", "4"])
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss_scale"] >= 1 for r in rows)
    (run,) = list(tmp_path.iterdir())
    assert "Loss Scale: " in (run / "log.txt").read_text()
    assert "Skipped Steps: " in (run / "log.txt").read_text()


def test_fp16_overflow_is_skipped_counted_and_the_scale_drops(tmp_path, digits8):
    # A 2^32 initial loss scale overflows the fp16 gradients: DeepSpeed must skip those steps
    # (counted in the log and metrics.jsonl), halve the scale, then train with finite losses.
    ds = tmp_path / "fp16_big_scale.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2},
                              "fp16": {"initial_scale_power": 32, "hysteresis": 1}}))
    results = tmp_path / "results"
    run_plain(["--features-path", str(digits8), "--results-dir", str(results), "--precision",
               "fp16", "--deepspeed_config", str(ds), "--max-steps", "12", "--ckpt-every", "12"])
    rows = metrics(results)
    assert rows[-1]["skipped_steps"] >= 1, rows
    assert rows[-1]["loss_scale"] < 2**32, rows
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in rows), rows  # finite
    skipped = [r["skipped_steps"] for r in rows]
    assert skipped == sorted(skipped), skipped  # a running count


def test_bf16_zero2_compile_and_grad_checkpointing(tmp_path, digits8):
    run_plain(["--features-path", str(digits8), "--results-dir", str(tmp_path), "--precision",
               "bf16", "--deepspeed_config", str(ROOT / "configs/deepspeed/zero2.json"),
               "--compile", "--grad-checkpointing", "0.5", "--lr", "2e-3", "--max-steps", "12",
               "--ckpt-every", "12"])
    rows = metrics(tmp_path)
    first, last = sum(r["loss"] for r in rows[:3]), sum(r["loss"] for r in rows[-3:])
    assert last < first, rows
    assert all(r["grad_norm"] is None or r["grad_norm"] > 0 for r in rows)
