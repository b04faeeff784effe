"""Smoke tests of the training-table runner (CPU, tiny, no pytest-benchmark): row selection, the
ratios against both baselines, each row's train.py command and Config, skipping rows that cannot run, the FLOP count, the CPU memory measure, and one real
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


def test_rows_select_in_the_order_given_and_reject_unknown_names():
    assert [r.key for r in table.select_rows("ckpt, original_math")] == ["ckpt", "original_math"]
    assert len(table.select_rows("all")) == len(table.ROWS)
    with pytest.raises(SystemExit, match="choose from"):
        table.select_rows("original_math,warp_drive")


def test_ratios_against_both_baselines_or_the_first_measured_fast_dit_row():
    rows = [_row("original_math", steps=2.0), _row("original_sdpa", steps=4.0), _row("ckpt", steps=1.0),
            _row("compile", status="skipped: x")]
    assert table.add_ratios(rows) == {"ratio": "original_math", "ratio_sdpa": "original_sdpa"}
    assert (rows[2]["ratio"], rows[2]["ratio_sdpa"]) == (pytest.approx(0.5), pytest.approx(0.25))
    assert rows[3]["ratio"] is None
    rows = [_row("original_math", status="OOM"), _row("ckpt", steps=0.5), _row("compile", steps=2.0)]
    assert table.add_ratios(rows) == {"ratio": "ckpt", "ratio_sdpa": None}
    assert rows[2]["ratio"] == pytest.approx(4.0) and rows[0]["ratio"] is None and rows[2]["ratio_sdpa"] is None
    text = report.markdown(rows, _fake_meta({"ratio": "ckpt", "ratio_sdpa": None}))
    assert "fast-DiT's grad-ckpt row (the math baseline did not run" in text and "| OOM |" in text


def _args(*extra):
    return table.resolve_defaults(table.parse_args(["--device", "cpu", "--steps", "1", *extra]))


def test_every_row_is_a_train_py_command_whose_config_says_what_the_row_says():
    """Each row's flags go through train.py's own parser; the columns are read back from that Config."""
    args = _args()
    expect = {"original_math": ("no", "fp32", False, "math", False, False, 0),
              "original_sdpa": ("no", "fp32", False, "sdpa", False, False, 0),
              "ckpt_mp_feat": ("full", "bf16", True, "sdpa", False, False, 0),
              "selective": ("selective", "bf16", True, "sdpa", False, False, 0),
              "zero2": ("full", "bf16", True, "sdpa", False, False, 2),
              "compile": ("full", "bf16", True, "sdpa", False, True, 0),
              "nockpt_compile_fused": ("no", "bf16", True, "sdpa", True, True, 0),
              "selective_compile_fused": ("selective", "bf16", True, "sdpa", True, True, 0)}
    fields = ("grad_ckpt", "precision", "pre_extracted", "attn_backend", "fused_adaln", "compile", "zero_stage")
    for row in table.ROWS:
        cfg = table.row_config(row, args)
        got = table.switches(cfg)
        if row.key in expect:
            assert tuple(got[f] for f in fields) == expect[row.key], row.key
        command = table.train_command(row, args)
        assert command.startswith(f"deepspeed --num_gpus 1 train.py --model DiT-S/{row.tiny_patch} ")
        assert ("--features-path" in command) == row.pre_extracted
    fp16 = table.row_config(next(r for r in table.ROWS if r.key == "ckpt_mp"), _args("--mp-dtype", "fp16"))
    assert fp16.train.precision == "fp16"


def test_rows_that_cannot_run_here_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _args()
    fused = next(r for r in table.ROWS if r.key == "fused_adaln")
    reason = table.unavailable_reason(fused, table.row_config(fused, args), torch.device("cpu"))
    assert reason and "TRITON_INTERPRET" in reason
    fa = RowConfig("fa", "fa", ("--attn-backend", "flash_attn"))
    assert table.run_row(fa, args)["status"].startswith("skipped: attention backend 'flash_attn' unavailable")
    fp16 = table.run_row(next(r for r in table.ROWS if r.key == "ckpt_mp_feat"), _args("--mp-dtype", "fp16"))
    assert fp16["status"].startswith("skipped: --precision fp16 needs a GPU")


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
        ["--device", "cpu", "--rows", "selective", "--batch", "2", "--steps", "1", "--warmup", "0",
         "--out", str(tmp_path)]))
    rows, meta = table.run_table(args, progress=False)
    (row,) = rows
    assert row["status"] == "ok"
    for field in ("steps_per_s", "images_per_s", "peak_mb", "mfu"):
        assert math.isfinite(row[field]) and row[field] > 0
    assert meta["reference_rows"] == {"ratio": None, "ratio_sdpa": None} and row["ratio"] is None
    assert len(list(tmp_path.iterdir())) == 3


def test_repa_row_reports_its_encoder_as_its_own_line(tmp_path):
    """The REPA row runs train.py's step with --repa (encoder inside it) beside its own baseline; the
    encoder's forward gets a line of its own: time per step, share of the step, memory."""
    pytest.importorskip("transformers")
    args = table.resolve_defaults(table.parse_args(
        ["--device", "cpu", "--rows", "repa_base,repa", "--batch", "2", "--steps", "1", "--warmup", "0",
         "--out", str(tmp_path)]))
    base, repa = table.run_table(args, progress=False)[0]
    assert base["status"] == repa["status"] == "ok" and "encoder_s" not in base
    assert "--repa --encoder '<encoder>' --encoder-depth 1 --projector-dim 128" in repa["command"]
    assert 0 < repa["encoder_s"] < repa["mean_step_s"] and 0 < repa["encoder_share"] < 1
    assert repa["encoder_weights_mb"] > 0 and repa["encoder_forward_peak_mb"] > 0
    text = report.markdown([base, repa], _fake_meta({"ratio": None, "ratio_sdpa": None}))
    line = next(x for x in text.splitlines() if "frozen encoder's forward" in x)
    assert line.count("|") == next(x for x in text.splitlines() if x.startswith("| row |")).count("|")
    assert f"{100 * repa['encoder_share']:.1f}% of the step" in line


def _fake_meta(reference):
    return {"model": "tiny", "image_size": 32, "latent_size": 16, "batch": 8, "device": "cpu", "torch": "x",
            "triton": "x", "deepspeed": "x", "diffusers": "x", "git_commit": "abc", "date": "2026-01-01",
            "time_utc": "00:00:00", "steps": 1, "warmup": 0, "mfu_note": "n", "train_flops_per_image": 1e9,
            "flops_note": "n", "memory_method": "m", "mixed_precision": "bf16", "fp32": "fp32", "vae_note": "v",
            "device_type": "cpu", "reference_rows": reference, "step": "s"}


def test_repa_cost_interleaves_both_rows_through_the_step():
    pytest.importorskip("transformers")
    import repa_cost
    result = repa_cost.main(["--device", "cpu", "--rounds", "2", "--steps", "1", "--batch", "2"])
    assert len(result["per_round_ratio"]) == 2 and result["ratio_repa_over_base"] > 0
    assert 0 < result["encoder_share_of_repa_step"] < 1
    assert "--repa" in result["commands"]["repa"] and "--repa" not in result["commands"]["repa_base"]


def test_repa_row_without_transformers_is_skipped_with_the_reason(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    row = next(r for r in table.ROWS if r.key == "repa")
    assert table.run_row(row, _args())["status"] == (
        "skipped: transformers is not installed (REPA's encoder needs it: pip install 'dit-fast[repa]')")
