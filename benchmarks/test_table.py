"""Smoke tests of the training-table runner (CPU, tiny, no pytest-benchmark): row selection, the
baseline/ratio logic, skipping rows that cannot run, the FLOP count, the CPU memory measure, and one real
row end to end. No speed is asserted."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops  # noqa: E402
import report  # noqa: E402
import table  # noqa: E402
from train_step import LiveBytes, RowConfig  # noqa: E402


def _row(key, status="ok", steps=None, **switches):
    r = {"key": key, "label": key, "status": status, **switches}
    if steps is not None:
        r["steps_per_s"] = steps
    return r


def test_rows_select_in_table_order_and_reject_unknown_names():
    assert [r.key for r in table.select_rows("ckpt, baseline")] == ["baseline", "ckpt"]
    assert len(table.select_rows("all")) == len(table.ROWS)
    with pytest.raises(SystemExit, match="choose from"):
        table.select_rows("baseline,warp_drive")


def test_ratio_is_against_the_baseline_or_the_first_measured_fast_dit_row():
    rows = [_row("baseline", steps=2.0), _row("ckpt", steps=1.0), _row("sdpa", status="skipped: x")]
    assert table.add_ratios(rows) == "baseline"
    assert rows[1]["ratio"] == pytest.approx(0.5) and rows[2]["ratio"] is None
    rows = [_row("baseline", status="OOM"), _row("ckpt", steps=0.5), _row("sdpa", steps=2.0)]
    assert table.add_ratios(rows) == "ckpt"
    assert rows[2]["ratio"] == pytest.approx(4.0) and rows[0]["ratio"] is None
    text = report.markdown(rows, _fake_meta("ckpt"))
    assert "fast-DiT yes/no/no (the baseline did not run" in text and "| OOM |" in text


def test_all_speedups_row_takes_what_worked_and_the_faster_attention():
    results = [_row("fused_adaln", status="skipped: no triton"), _row("sdpa", steps=3.0),
               _row("triton_attn", steps=4.0), _row("compile", status="error: boom")]
    all_row = next(r for r in table.ROWS if r.key == "all")
    combined = table.combine_speedups(all_row, results, torch.device("cpu"))
    assert (combined.fused_adaln, combined.attn_backend, combined.compile, combined.grad_ckpt) == \
        (False, "triton", False, True)
    no_ckpt = table.combine_speedups(next(r for r in table.ROWS if r.key == "all_no_ckpt"), results,
                                     torch.device("cpu"))
    assert not no_ckpt.grad_ckpt and "no grad ckpt" in no_ckpt.label


def test_rows_that_cannot_run_here_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = table.unavailable_reason(RowConfig("x", "x", fused_adaln=True, pre_extracted=True), torch.device("cpu"))
    assert reason and "TRITON_INTERPRET" in reason
    args = table.resolve_defaults(table.parse_args(["--device", "cpu", "--steps", "1"]))
    setup = table.make_setup(args)
    result = table.run_row(RowConfig("fa", "fa", attn_backend="flash_attn", pre_extracted=True), setup, args)
    assert result["status"].startswith("skipped: attention backend 'flash_attn' unavailable")


def test_dit_xl2_flops_match_the_paper():
    from dit_fast.models import DiT_models
    forward = flops.forward_flops_per_image(lambda: DiT_models["DiT-XL/2"](attn_backend="math"), 32)
    # 118.6 G multiply-adds per image forward (the paper's "Gflops"): 237.2 GFLOP, 3x for training.
    assert forward == pytest.approx(237.24e9, rel=1e-3)
    assert flops.train_flops_per_image(forward) == 3 * forward


def test_gpu_peaks_by_name_and_a_measured_cpu_peak():
    assert flops.spec_peak("NVIDIA H100 80GB HBM3", True) == pytest.approx(989.4e12)
    assert flops.spec_peak("NVIDIA H100 PCIe", False) == pytest.approx(378e12)
    assert flops.spec_peak("NVIDIA A100-SXM4-80GB", True) == pytest.approx(312e12)
    assert flops.spec_peak("Some Future GPU", True) is None
    peak = flops.PeakTable(torch.device("cpu")).peak(mixed_precision=False)
    assert peak.flops_per_s > 0 and "measured" in peak.source


def test_live_bytes_counts_new_storages_once_and_releases_them():
    base = torch.zeros(1000)                       # 4000 bytes alive at the start
    tracker = LiveBytes()
    tracker.add(base)
    with tracker:
        a = torch.ones(2000)                       # +8000
        view = a[:10]                              # a view: no new storage
        del a
        base.add_(1)                               # in place: nothing new
        b = torch.ones(500)                        # +2000 while a is still held by the view
        del view
    assert tracker.peak == 4000 + 8000 + 2000
    assert tracker.current == 4000 + 2000
    del b


def test_one_row_end_to_end(tmp_path):
    args = table.resolve_defaults(table.parse_args(
        ["--device", "cpu", "--rows", "ckpt_mp_feat", "--batch", "2", "--steps", "1", "--warmup", "0",
         "--out", str(tmp_path)]))
    rows, meta = table.run_table(args, progress=False)
    (row,) = rows
    assert row["status"] == "ok"
    for field in ("steps_per_s", "images_per_s", "peak_mb", "mfu"):
        assert math.isfinite(row[field]) and row[field] > 0
    assert meta["reference_row"] is None and row["ratio"] is None  # no baseline row asked for: no ratio
    assert len(list(tmp_path.iterdir())) == 3


def _fake_meta(reference):
    return {"model": "tiny", "image_size": 32, "latent_size": 16, "batch": 8, "device": "cpu", "torch": "x",
            "triton": "x", "deepspeed": "x", "diffusers": "x", "git_commit": "abc", "date": "2026-01-01",
            "time_utc": "00:00:00", "steps": 1, "warmup": 0, "mfu_note": "n", "train_flops_per_image": 1e9,
            "flops_note": "n", "memory_method": "m", "mixed_precision": "bf16", "fp32": "fp32", "vae_note": "v",
            "device_type": "cpu", "reference_row": reference}
