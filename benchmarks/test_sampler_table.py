"""Smoke tests of the sampler speed-quality runner (CPU, tiny, untrained model): row parsing, one real
quality row through build_sampler + DigitScorer, and the markdown/JSON/PNG writers. No quality is asserted."""
import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sampler_table  # noqa: E402

pytest.importorskip("diffusers")


def test_rows_parse_and_bad_rows_name_the_choices():
    assert sampler_table.parse_rows("ddpm:250, heun:10") == [("ddpm", 250), ("heun", 10)]
    assert len(sampler_table.parse_rows(sampler_table.DEFAULT_ROWS)) == 13
    with pytest.raises(ValueError, match="dpm-solver\\+\\+"):
        sampler_table.parse_rows("dpm:10")
    with pytest.raises(ValueError, match="sampler:steps"):
        sampler_table.parse_rows("euler:0")


def test_one_quality_row_and_the_outputs(tmp_path):
    from dit_fast.models import DiT
    from dit_fast.scoring import DigitScorer

    torch.set_num_threads(1)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                num_classes=10).eval()
    labels = torch.arange(10).repeat_interleave(2)
    zs = {s: torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1)}
    args = argparse.Namespace(cfg_scale=3.0, precision="fp32", compile=False, seeds=[0, 1], xl_timing=False,
                              out_dir=str(tmp_path))
    rows, scorer = [], DigitScorer(8)  # fitting the classifier is the slow part: once
    for name, steps in (("ddpm", 3), ("heun", 2)):
        with torch.no_grad():
            rows.append(sampler_table.quality_row(model, name, steps, zs, labels, scorer, args))
    assert [r["nfe"] for r in rows] == [3, 3] and 0 <= rows[0]["accuracy"] <= 1
    assert len(rows[1]["frechet_distance_per_seed"]) == 2
    ref = rows[0].pop("_reference")
    rows[1].pop("_reference")
    meta = sampler_table.metadata(args, torch.device("cpu"), {
        "model": "tiny", "num_samples": 20, "frechet_distance_real_subset": ref["frechet_distance_real_subset"],
        "classifier_heldout_accuracy": ref["classifier_heldout_accuracy"],
        "frechet_features": ref["frechet_features"]})
    md, js, png = sampler_table.write_outputs(rows, meta, args, torch.device("cpu"))
    assert "| heun | 2 | 3 |" in md.read_text() and "HeunDiscreteScheduler" in md.read_text()
    assert json.loads(js.read_text())["meta"]["diffusers"] and Image.open(png).size[0] > 400
    assert not list(tmp_path.glob("*.tmp*"))


def test_timing_mode_smoke(tmp_path):
    """The GPU images/s mode, here with a small model and batch 1 on the CPU (no speed asserted)."""
    torch.set_num_threads(1)
    args = sampler_table.parse_args(["--xl-timing", "--timing-model", "DiT-S/8", "--batch", "1",
                                     "--rows", "dpm-solver++:2,heun:2", "--out-dir", str(tmp_path)])
    rows, extra = sampler_table.run_xl_timing(args, torch.device("cpu"))
    assert [r["nfe"] for r in rows] == [2, 3] and all(r["images_per_s"] > 0 for r in rows)
    meta = sampler_table.metadata(args, torch.device("cpu"), extra)
    md, _, png = sampler_table.write_outputs(rows, meta, args, torch.device("cpu"))
    assert "images/s" in md.read_text() and "DiT-S/8 256x256" in md.read_text() and png.is_file()


def test_flow_rows_parse_and_sample(tmp_path):
    """The flow rows: names checked, one ODE (fixed step), dopri5 (NFE counted) and SDE row on a tiny model."""
    from dit_fast.config import Config
    from dit_fast.models import DiT
    from dit_fast.scoring import DigitScorer

    assert len(sampler_table.parse_rows(sampler_table.DEFAULT_FLOW_ROWS, sampler_table.FLOW_SAMPLERS)) == 10
    with pytest.raises(ValueError, match="flow-euler"):
        sampler_table.parse_rows("flow-rk4:5", sampler_table.FLOW_SAMPLERS)
    torch.set_num_threads(1)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                num_classes=10).eval()
    labels = torch.arange(10)
    zs = {0: torch.randn(10, 1, 8, 8)}
    args = argparse.Namespace(cfg_scale=3.0, precision="fp32", compile=False)
    scorer = DigitScorer(8)
    rows = [sampler_table.quality_row(model, name, steps, zs, labels, scorer, args, Config())
            for name, steps in (("flow-heun", 3), ("flow-sde-euler", 4), ("flow-dopri5", 3))]
    assert [r["nfe"] for r in rows[:2]] == [4, 4] and rows[2]["nfe"] >= 6  # dopri5: 6 calls a step at least
    assert "SiT ODE heun" in rows[0]["scheduler"] and "torchdiffeq" in rows[2]["scheduler"]
