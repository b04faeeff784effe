"""Runs that survive, proven by injecting the faults (dit_fast.faults) into the real launcher:
`deepspeed --num_gpus 2 train.py` on two CPU ranks (gloo), ZeRO-2, a tiny DiT on the digits.

- kill anywhere: SIGKILL at six points (mid-step, mid-save after DeepSpeed's files on rank 1,
  mid-save between our files, at an epoch boundary, between the two renames of a replacing
  publish, before the prune), each followed by a resume: the per-step losses, the final module
  weights, the fp32 optimizer partitions and the EMA equal an uninterrupted run's bit for bit;
- a NaN on one rank only: every rank stops at the same sync step, naming the step and the rank;
- a stuck rank: the job fails within --collective-timeout, naming the rank that never arrived;
- two experiments in one results dir (plain python): --resume auto never crosses them.

Cost: one 8-step digits epoch of a 2-block, width-64 DiT per launch; ~25 s a launch on 2 cores.
"""
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from dit_fast.distributed import cpu_allreduce_segments, free_port
from tests.test_train_launch import (ROOT, _clean_env, check_ema_export, launch, launch_command, losses, ok,
                                     run_dir_of)

pytestmark = pytest.mark.slow

# 1797 digits / 2 ranks / micro batch 128 = 7 optimizer steps per epoch: an epoch boundary at 7.
COMMON = ["--global-batch-size", "256", "--num-workers", "1", "--max-steps", "10",
          "--ckpt-every", "2", "--deepspeed_config", str(ROOT / "configs/deepspeed/zero2.json")]
FAULT = "DIT_FAST_FAULT"


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    from dit_fast.data import write_digits_features
    return write_digits_features(tmp_path_factory.mktemp("digits") / "feat8", 8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits8):
    """One uninterrupted run, shared by the fault tests."""
    results = tmp_path_factory.mktemp("reference")
    ok(launch([*COMMON, "--features-path", str(digits8), "--results-dir", str(results),
               "--keep-last", "0"]))
    return run_dir_of(results)


def tensors(obj, prefix=""):
    """{key path: tensor} of every tensor inside nested dicts / lists (DeepSpeed's files)."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every tensor of every file (our EMA / train state and DeepSpeed's module and optimizer
    shards) bit-identical; RNG files too, so the runs would go on identically."""
    names = sorted(p.relative_to(a) for p in a.rglob("*.pt"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*.pt"))
    for name in names:  # our own test files: DeepSpeed's need full unpickling
        ta = tensors(torch.load(a / name, map_location="cpu", weights_only=False))
        tb = tensors(torch.load(b / name, map_location="cpu", weights_only=False))
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{name}{key} differs"


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def crash(args, fault: str) -> None:
    proc = launch(args, env={FAULT: fault})
    assert proc.returncode != 0, f"{fault} did not kill the run:\n{proc.stdout[-2000:]}"


def test_kill_anywhere_then_resume_is_bit_exact(tmp_path, digits8, reference):
    ref = losses(reference)
    assert [s for s, _ in ref] == list(range(1, 11))
    assert sum(l for _, l in ref[-3:]) < 0.8 * sum(l for _, l in ref[:3]), ref  # it learns
    args = [*COMMON, "--features-path", str(digits8), "--results-dir", str(tmp_path)]
    auto = [*args, "--resume", "auto"]

    crash(args, "kill:step.mid:3")  # mid-step: steps 3 was taken, never saved
    run = run_dir_of(tmp_path)
    assert ckpt_names(run) == ["step-0000002"]
    crash(auto, "kill:save.after_engine:4:1")  # rank 1 dies after DeepSpeed's shards
    assert ckpt_names(run) == ["step-0000002", "step-0000004.tmp"]
    crash(auto, "kill:save.after_ema:4")  # rank 0 dies between our files
    assert ckpt_names(run) == ["step-0000002", "step-0000004.tmp"]
    crash(auto, "kill:epoch.boundary:7")  # epoch 0 done, epoch 1's loader not yet started
    assert ckpt_names(run) == ["step-0000004", "step-0000006"]
    # Restart from an older step: the save of step 6 replaces the existing one; die between the
    # renames (step-6 moved aside, the new one not in place). Auto-resume must put it back.
    crash([*args, "--resume", str(run / "checkpoints" / "step-0000004")],
          "kill:publish.between_renames:6")
    assert ckpt_names(run) == ["step-0000004", "step-0000006.old", "step-0000006.tmp"]
    crash(auto, "kill:save.before_prune:8")  # published, older ones not pruned yet
    assert ckpt_names(run) == ["step-0000004", "step-0000006", "step-0000006.tmp", "step-0000008"]
    out = ok(launch(auto))
    assert "continuing " + str(run / "checkpoints" / "step-0000008") in out.stdout + out.stderr

    assert losses(run) == ref  # every step once (metrics.jsonl truncated on resume), same bits
    assert ckpt_names(run) == ["step-0000008", "step-0000010"]
    assert_same_checkpoint(reference / "checkpoints" / "step-0000010",
                           run / "checkpoints" / "step-0000010")
    check_ema_export(run / "checkpoints" / "step-0000010", 10)


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, digits8):
    args = [*COMMON, "--features-path", str(digits8), "--results-dir", str(tmp_path),
            "--log-every", "4", "--max-steps", "8", "--ckpt-every", "100"]
    start = time.monotonic()
    proc = launch(args, env={FAULT: "nan:loss:3:1"})
    elapsed = time.monotonic() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # Both ranks name it (rank 0 logs it too); nobody waits for a collective timeout.
    want = "non-finite loss (NaN/inf) at step 3 on rank 1 (every rank stops at step 4)"
    assert text.count(want) >= 2, text[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 120, elapsed
    assert not (run_dir_of(tmp_path) / "checkpoints").exists()  # nothing saved of the bad state


def test_stuck_rank_fails_within_the_collective_timeout_naming_it(tmp_path, digits8):
    """Rank 1 hangs before step 3's loss all-reduce: rank 0 gives up after --collective-timeout, names
    the rank and exits 1, and the launcher starts stopping the job ('Killing subprocess'). The stuck
    rank only flags the launcher's SIGTERM (a preemption request it never reaches a step boundary to
    honour), so the launcher kills it after DeepSpeed's fixed 30 s grace; the test ends the launch
    once the launcher has begun, instead of sitting out the grace."""
    args = [*COMMON, "--features-path", str(digits8), "--results-dir", str(tmp_path),
            "--collective-timeout", "20"]
    port = free_port()
    env = _clean_env({FAULT: "hang:sync:3:1", "PYTHONUNBUFFERED": "1"})  # the launcher's log, unbuffered
    start = time.monotonic()
    proc = subprocess.Popen(launch_command(args, port), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    text = ""
    try:
        for line in proc.stdout:
            text += line
            if "Killing subprocess" in line:
                break
    finally:
        elapsed = time.monotonic() - start
        watchdog.cancel()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert "Killing subprocess" in text, text[-3000:]
    assert "step 3: the loss all-reduce on rank 0 did not complete within --collective-timeout 20 s: " \
           "rank(s) [1] never reached it" in text, text[-3000:]
    assert elapsed < 120, elapsed  # start-up (~10-25 s) + the 20 s timeout, not the 1 h sleep
    metrics = [json.loads(line)["step"] for line in (run_dir_of(tmp_path) / "metrics.jsonl")
               .read_text().splitlines()]
    assert metrics == [1, 2]
    assert not cpu_allreduce_segments(port)


def test_two_experiments_in_one_results_dir_never_cross(tmp_path, digits8):
    """Same model, other --lr, one --results-dir: restarting the OLDER experiment continues it (not
    the newer, higher-numbered run), and a third setting starts fresh, saying what differed."""
    import subprocess
    import sys

    from tests.test_train_launch import TINY, _clean_env

    def run(*args):
        cmd = [sys.executable, "train.py", *TINY, "--features-path", str(digits8), "--results-dir",
               str(tmp_path), "--precision", "fp32", "--ckpt-every", "2", *args]
        return ok(subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                                 timeout=300))

    run("--lr", "1e-3", "--max-steps", "2")
    run("--lr", "2e-3", "--max-steps", "4")  # newer, and further along
    out = run("--lr", "1e-3", "--max-steps", "4", "--resume", "auto")
    log = out.stdout + out.stderr
    a, b = sorted(tmp_path.iterdir())
    assert f"continuing {a / 'checkpoints' / 'step-0000002'}" in log, log[-3000:]
    assert "optim.lr: checkpoint 0.002 vs now 0.001" in log  # the other run was a candidate
    assert ckpt_names(a) == ckpt_names(b) == ["step-0000002", "step-0000004"]
    assert json.loads((b / "config.json").read_text())["optim"]["lr"] == 2e-3  # untouched
    out = run("--lr", "5e-3", "--max-steps", "2", "--resume", "auto")
    assert "no matching checkpoint" in out.stdout + out.stderr
    assert len(list(tmp_path.iterdir())) == 3
