"""Moving a run to another number of ranks.

- the sampler: optimizer step k draws the same items for any world size (and grad accumulation), so
  a resumed run on W' ranks continues the global sample order of the W-rank run;
- under the real launcher (slow): a two-rank ZeRO-2 checkpoint resumed on one rank, and a one-rank
  checkpoint resumed on two, through DeepSpeed's universal checkpoint (converted once, logged): the
  consolidated fp32 master weights and Adam moments after loading equal the checkpoint's, the EMA
  is the checkpoint's, and the loss continues without a jump.
"""
import subprocess
import sys

import pytest
import torch

from dit_fast.train.data import ResumableShardSampler


def global_batches(n, world, global_batch, accum, seed=3, epoch=1):
    """[set of items of optimizer step k] for one epoch, gathered over every rank."""
    micro = global_batch // (world * accum)
    samplers = [ResumableShardSampler(n, r, world, micro, seed, with_flips=True) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    steps = len(per_rank[0]) // accum
    return [sorted(item for r in range(world) for b in per_rank[r][k * accum:(k + 1) * accum]
                   for item in b) for k in range(steps)]


@pytest.mark.parametrize("n", [1797, 1000, 64])
def test_global_batch_k_is_the_same_items_for_any_world_size(n):
    one = global_batches(n, 1, 16, 1)
    for world, accum in [(2, 1), (4, 2), (8, 1), (16, 1)]:
        other = global_batches(n, world, 16, accum)
        steps = min(len(one), len(other))
        assert steps >= len(one) - 1  # padding may drop or add the epoch's last, partial step
        assert other[:steps] == one[:steps], (world, accum)


def test_resume_skip_lands_on_the_same_global_batch():
    """A resume at step_in_epoch k skips k * accum micro-batches on every rank."""
    full = global_batches(500, 2, 20, 1)
    samplers = [ResumableShardSampler(500, r, 4, 5, 3, with_flips=True) for r in range(4)]
    for s in samplers:
        s.set_epoch(1, skip_batches=7)
    first = sorted(item for s in samplers for item in next(iter(s)))
    assert first == full[7]


# ---------------------------------------------------------------- through the launcher (slow)

def consolidated(ckpt, tmp):
    """{param/key: tensor}: fp32 master, exp_avg, exp_avg_sq of every parameter, consolidated over
    the ZeRO partitions by DeepSpeed's own converter, and the EMA."""
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal
    out = tmp / f"u-{ckpt.name}-{len(list(tmp.iterdir()))}"
    src = out.with_name(out.name + "-src")
    shutil.copytree(ckpt / "ds", src)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(src), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
    found = {f"{p.parent.name}/{p.stem}": torch.load(p, weights_only=False)["param"]
             for p in (out / "zero").glob("*/*.pt") if p.stem in ("fp32", "exp_avg", "exp_avg_sq")}
    ema = torch.load(next(ckpt.glob("ema-*.pt")), weights_only=True)["ema"]
    found.update({f"ema/{k}": v for k, v in ema.items()})
    return found


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and any(k.endswith("/exp_avg_sq") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_ranks_to_one_and_one_to_two(tmp_path):
    import shutil

    from dit_fast.data import write_digits_features
    from tests.test_train_faults import COMMON, ckpt_names
    from tests.test_train_launch import ROOT, TINY, _clean_env, launch, losses, ok, run_dir_of
    digits = write_digits_features(tmp_path / "feat8", 8)
    args = [*COMMON, "--features-path", str(digits), "--results-dir", str(tmp_path / "r"),
            "--keep-last", "0"]
    ok(launch([*args, "--max-steps", "6"]))  # two ranks, ZeRO-2: the reference curve
    run = run_dir_of(tmp_path / "r")
    ref = losses(run)
    step4 = run / "checkpoints" / "step-0000004"
    before = consolidated(step4, tmp_path)

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
    assert_same_state(consolidated(step4, tmp_path), before)
    after = losses(run)
    assert [s for s, _ in after] == [1, 2, 3, 4, 5, 6]
    for (_, mine), (_, theirs) in zip(after[4:], ref[4:]):  # other noise draws, same batches
        assert abs(mine - theirs) < 0.1 * theirs, (after, ref)

    step6 = run / "checkpoints" / "step-0000006"
    before = consolidated(step6, tmp_path)
    out = ok(launch([*args, "--max-steps", "7", "--resume", "auto"]))  # back on two ranks
    log = out.stdout + out.stderr
    assert "Resuming a 1-rank checkpoint on 2 rank(s)" in log and "micro batch per rank 256 -> 128" in log
    assert_same_state(consolidated(step6, tmp_path), before)
    assert ckpt_names(run)[-1] == "step-0000007"
    assert [s for s, _ in losses(run)] == list(range(1, 8))
    shutil.rmtree(tmp_path / "r")


def test_layout_decision_and_zero3_refusal(tmp_path):
    """Same world and stage: the checkpoint itself; ZeRO-3 on either side of a change: one line."""
    from dit_fast.train.reshard import engine_load_dir
    ckpt = tmp_path / "step-0000004"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "ds" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    torch.save({"world_size": 2, "zero_stage": 2, "config": {"train": {}}}, ckpt / "train_state.pt")
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4,
          "gradient_accumulation_steps": 1}
    assert engine_load_dir(ckpt, 2, 0, ds, print) == ckpt and "checkpoint" not in ds
    with pytest.raises(ValueError, match=r"ZeRO-2, 2 ranks\) under ZeRO-3 on 2 ranks"):
        engine_load_dir(ckpt, 2, 0, {**ds, "zero_optimization": {"stage": 3}}, print)
    with pytest.raises(ValueError, match=r"under ZeRO-3 on 1 ranks"):
        engine_load_dir(ckpt, 1, 0, {**ds, "zero_optimization": {"stage": 3}}, print)
