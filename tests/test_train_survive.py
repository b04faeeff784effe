"""Preemption, a full disk, damaged checkpoints (issue 21) under the real launcher: `deepspeed
--num_gpus 2 train.py` on two CPU ranks (gloo), ZeRO-2, the tiny DiT of tests/test_train_faults.py;
and plain `python`.

- a signal reaching ONE rank at a random step: every rank stops after that very step, saves it,
  exits 75 (PREEMPTED_EXIT); a second signal in the middle of the next preemption save kills the
  ranks at once and leaves the previous checkpoint; `--resume auto` then runs to the end with
  per-step losses, weights, fp32 optimizer partitions and EMA bit-identical to an uninterrupted run;
- the file-size limit (RLIMIT_FSIZE) reached mid-run: the next save fails on both ranks with one
  line each naming the checkpoint, the file, "File too large" and the last complete checkpoint, no
  traceback, no .tmp left, the earlier checkpoints verified intact; then a byte flipped in the newest
  one's rank-1 optimizer shard: --resume auto falls back to the one before, warning, and ends
  bit-identical to the uninterrupted run;
- a full 5 MB tmpfs (plain python): the same one line with "No space left on device";
- a two-rank ZeRO-2 checkpoint resumed on one rank and a one-rank one on two (universal checkpoint);
- plain python with a DataLoader worker, SIGTERM to the whole process group (what SLURM does):
  exit 75 (the worker ignores it), the checkpoint is the last
  logged step, and the rerun continues from it.

Cost: three launches (~25 s each on 2 cores) plus the shared reference run, two plain-python runs.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import pytest

from dit_fast.distributed import free_port
from tests.test_train_faults import COMMON, FAULT, assert_same_checkpoint, ckpt_names, digits8, reference  # noqa: F401
from tests.test_train_launch import ROOT, TINY, _clean_env, launch, launch_command, losses, ok, run_dir_of

pytestmark = pytest.mark.slow
PREEMPTED_EXIT = 75


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll a log file until it holds ``text`` (the process must still be running)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text():
            return
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_signal_on_one_rank_saves_that_step_second_signal_keeps_previous_resume_exact(
        tmp_path, digits8, reference):
    ref = losses(reference)
    k = random.randint(2, 6)  # the step the signal arrives at
    args = [*COMMON, "--features-path", str(digits8), "--results-dir", str(tmp_path),
            "--ckpt-every", "100"]
    auto = [*args, "--resume", "auto"]

    proc = launch(args, env={FAULT: f"usr1:step.mid:{k}:1"})  # rank 1 only: the ranks must agree
    text = proc.stdout + proc.stderr
    assert proc.returncode == PREEMPTED_EXIT, text[-3000:]
    assert text.count(f"stopped by a signal after step {k};") == 2, text[-3000:]  # one line a rank
    assert "Traceback" not in text
    run = run_dir_of(tmp_path)
    assert ckpt_names(run) == [f"step-{k:07d}"]
    assert losses(run) == ref[:k]

    # Next launch: a SIGTERM at step k + 2, then, while rank 0 is inside that save, a second
    # SIGTERM through the launcher (which forwards it to the ranks): they die at once.
    k2 = k + 2
    port = free_port()
    env = _clean_env({FAULT: f"term:step.mid:{k2},hang:save.after_engine:{k2}:0"})
    runner = subprocess.Popen(launch_command(auto, port), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(run / "log.txt", f"saving step {k2}, then stopping", runner)
        time.sleep(2.5)  # past the window in which a repeat counts as the same request
        launcher = next(p for p in psutil.Process(runner.pid).children()
                        if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
        launcher.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=25) != 0  # well inside the launcher's 30 s before SIGKILL
    finally:
        if runner.poll() is None:
            runner.kill()
    assert ckpt_names(run) == [f"step-{k:07d}", f"step-{k2:07d}.tmp"]

    out = ok(launch(auto))
    assert f"continuing {run / 'checkpoints' / f'step-{k:07d}'}" in out.stdout + out.stderr
    assert losses(run) == ref
    assert_same_checkpoint(reference / "checkpoints" / "step-0000010",
                           run / "checkpoints" / "step-0000010")


def test_plain_python_signalled_from_outside_saves_and_continues(tmp_path, digits8):
    args = [sys.executable, "train.py", *TINY, "--features-path", str(digits8), "--results-dir",
            str(tmp_path), "--ckpt-every", "1000", "--max-steps", "100000", "--num-workers", "1"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not list(tmp_path.glob("*/metrics.jsonl")) or \
                len(next(tmp_path.glob("*/metrics.jsonl")).read_text().splitlines()) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: the whole tree, DataLoader worker too
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    run = run_dir_of(tmp_path)
    stop = losses(run)[-1][0]
    assert ckpt_names(run) == [f"step-{stop:07d}"]
    assert f"stopped by a signal after step {stop};" in err and "Traceback" not in err
    args[args.index("100000")] = str(stop + 2)
    out = ok(subprocess.run([*args, "--resume", "auto"], cwd=ROOT, env=_clean_env(),
                            capture_output=True, text=True, timeout=300))
    assert f"Resumed from {run / 'checkpoints' / f'step-{stop:07d}'} at step {stop}" in out.stderr + out.stdout
    assert [s for s, _ in losses(run)] == list(range(1, stop + 3))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == stop + 2


def test_file_size_limit_mid_run_then_a_damaged_newest_checkpoint(tmp_path, digits8, reference):
    ref = losses(reference)
    args = [*COMMON, "--features-path", str(digits8), "--results-dir", str(tmp_path)]
    proc = launch(args, env={FAULT: "fsize:step.mid:5"})  # saves 2 and 4 fine, 6 hits the limit
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    run = run_dir_of(tmp_path)
    last = run / "checkpoints" / "step-0000004"
    lines = [line for line in text.splitlines() if "could not be written" in line]
    assert len(lines) == 2, text[-3000:]
    for rank in (0, 1):
        line = next(x for x in lines if f"error: rank {rank}: checkpoint step-0000006 could not" in x)
        assert f"(rank {rank}: {run / 'checkpoints' / 'step-0000006.tmp'}" in line
        assert f": File too large); the partial step-0000006.tmp was removed; the last complete " \
               f"checkpoint is {last} " in line
    assert "Traceback" not in text
    assert ckpt_names(run) == ["step-0000002", "step-0000004"]
    from dit_fast.train.verify import main as verify
    assert verify([str(run)]) == 0  # both intact (sizes and CRC-32 as written)

    # Now damage the newest: one byte of rank 1's optimizer shard. --resume auto must fall back to
    # step 2, warning, and still reach the uninterrupted run's bits.
    shard = last / "ds" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    out = ok(launch([*args, "--resume", "auto"]))
    log = out.stdout + out.stderr
    assert f"skipping damaged checkpoint {last}: {shard}: contents changed" in log, log[-3000:]
    assert f"continuing {run / 'checkpoints' / 'step-0000002'}" in log
    assert losses(run) == ref
    assert_same_checkpoint(reference / "checkpoints" / "step-0000010",
                           run / "checkpoints" / "step-0000010")

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 5 MB tmpfs (room for one checkpoint of the tiny DiT, not two); skipped where mount is not
    permitted (not root, no CAP_SYS_ADMIN in a container)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_filesystem_mid_run_plain_python(small_tmpfs, digits8):
    args = [sys.executable, "train.py", *TINY, "--features-path", str(digits8), "--results-dir",
            str(small_tmpfs), "--ckpt-every", "2", "--max-steps", "6", "--precision", "fp32"]
    proc = subprocess.run(args, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    run = run_dir_of(small_tmpfs)
    first = run / "checkpoints" / "step-0000002"
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("train.py: error: rank 0: checkpoint step-0000004 could not be written")
    assert ": No space left on device); the partial step-0000004.tmp was removed; the last complete " \
           f"checkpoint is {first} " in errors[0]
    assert "free holds fewer than the 3 checkpoints" in proc.stderr  # the pre-flight warning
    assert ckpt_names(run) == ["step-0000002"]
    from dit_fast.train.verify import main as verify
    assert verify([str(run)]) == 0


def test_two_ranks_to_one_and_one_to_two(tmp_path, digits8, reference):
    """The two-rank ZeRO-2 reference's step 4 resumed on one rank (plain python), then that run's
    step 6 on two again: DeepSpeed's universal checkpoint, converted once, logged; the consolidated
    fp32 master, both Adam moments and the EMA after loading equal the checkpoint's (the loaded step
    is written again in the new layout); the loss goes on without a jump. Then step 7 on the same two
    ranks under ZeRO-1: the same path for a change of stage."""
    import shutil

    from tests.test_reshard import assert_same_state, consolidated
    args = [*COMMON, "--features-path", str(digits8), "--results-dir", str(tmp_path / "r"),
            "--keep-last", "0"]
    shutil.copytree(reference, tmp_path / "r" / reference.name)
    (tmp_path / "u").mkdir()
    run = run_dir_of(tmp_path / "r")
    ref = losses(run)
    step4 = run / "checkpoints" / "step-0000004"
    before = consolidated(step4, tmp_path / "u")

    def plain(*extra):
        cmd = [sys.executable, "train.py", *TINY, *args, *extra]
        return ok(subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                                 timeout=300))
    out = plain("--max-steps", "6", "--resume", str(step4))  # on one rank
    log = out.stdout + out.stderr
    assert "Resuming a 2-rank checkpoint on 1 rank(s): global batch 256 unchanged; micro batch per " \
           "rank 128 -> 256" in log, log[-3000:]
    assert f"Converting {step4 / 'ds'} to DeepSpeed's universal checkpoint" in log
    # step 4 was written again by the one rank: the state it loaded, in the one-rank layout
    assert torch.load(step4 / "train_state.pt", weights_only=True)["world_size"] == 1
    assert_same_state(consolidated(step4, tmp_path / "u"), before)
    after = losses(run)
    assert [s for s, _ in after] == [1, 2, 3, 4, 5, 6]  # 7.. were cut back on resume
    for (_, mine), (_, theirs) in zip(after[4:], ref[4:]):  # other noise draws, same batches
        assert abs(mine - theirs) < 0.1 * theirs, (after, ref)

    step6 = run / "checkpoints" / "step-0000006"
    before = consolidated(step6, tmp_path / "u")
    out = ok(launch([*args, "--max-steps", "7", "--resume", "auto"]))  # back on two ranks
    log = out.stdout + out.stderr
    assert "Resuming a 1-rank checkpoint on 2 rank(s)" in log and "micro batch per rank 256 -> 128" in log
    assert_same_state(consolidated(step6, tmp_path / "u"), before)
    assert "step-0000007" in ckpt_names(run)
    assert [s for s, _ in losses(run)] == list(range(1, 8))

    # Same two ranks, another ZeRO stage: step 7 (ZeRO-2) continued under ZeRO-1, through the
    # universal form as well; the loaded state is the checkpoint's, and the next loss follows on.
    step7 = run / "checkpoints" / "step-0000007"
    before, seven = consolidated(step7, tmp_path / "u"), losses(run)
    at = args.index("--deepspeed_config") + 1
    zero1 = [*args[:at], str(ROOT / "configs/deepspeed/zero1.json"), *args[at + 1:]]
    out = ok(launch([*zero1, "--max-steps", "8", "--resume", "auto"]))
    log = out.stdout + out.stderr
    assert "The checkpoint was written under ZeRO-2, this run uses ZeRO-1" in log, log[-3000:]
    assert "through the universal form (another ZeRO stage)" in log
    assert_same_state(consolidated(step7, tmp_path / "u"), before)
    eight = losses(run)
    assert eight[:7] == seven and eight[7][0] == 8 and abs(eight[7][1] - ref[7][1]) < 0.1 * ref[7][1], eight
