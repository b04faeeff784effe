"""Moving a run to another number of ranks.

- the sampler: optimizer step k draws the same items for any world size (and grad accumulation), so
  a resumed run on W' ranks continues the global sample order of the W-rank run;
- which layout a resume loads, and the one-line refusal of ZeRO-3 on either side of a change.
(Under the real launcher, 2 -> 1 and 1 -> 2 ranks: tests/test_train_survive.py.)
"""
import pytest
import torch

from dit_fast.train.data import ShardOrder


def global_batches(n, world, global_batch, accum, seed=3, epoch=1):
    """[set of items of optimizer step k] for one epoch, gathered over every rank."""
    micro = global_batch // (world * accum)
    samplers = [ShardOrder(n, r, world, micro, seed, with_flips=True) for r in range(world)]
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
    samplers = [ShardOrder(500, r, 4, 5, 3, with_flips=True) for r in range(4)]
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
