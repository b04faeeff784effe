"""The training table on a CPU: a tiny DiT, four rows through train.py's step, two timed steps. Checks that
every row carries real measurements (positive, finite) and its train.py command, that the files are
written with their provenance, and that gradient checkpointing lowers the measured memory. Speed is
never asserted."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ROWS = "original_math,original_sdpa,ckpt,ckpt_mp_feat"

pytest.importorskip("diffusers", reason="the VAE-on-the-fly rows need diffusers")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import table as table_module
    assert Path(table_module.__file__).resolve().parent == BENCHMARKS, "another 'table' module shadows ours"
    out = tmp_path_factory.mktemp("table")
    args = table_module.resolve_defaults(table_module.parse_args(
        ["--device", "cpu", "--rows", ROWS, "--batch", "8", "--steps", "2", "--warmup", "1", "--out", str(out)]))
    rows, meta = table_module.run_table(args, progress=False)
    return table_module, rows, meta, out


def test_every_row_has_real_numbers(table):
    _, rows, meta, _ = table
    assert [r["key"] for r in rows] == ROWS.split(",")
    for r in rows:
        assert r["status"] == "ok", r
        for field in ("steps_per_s", "images_per_s", "peak_mb", "mfu", "ratio", "ratio_sdpa", "mean_step_s"):
            value = r[field]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (r["key"], field, value)
        assert r["mfu"] < 1.0, r
        assert len(r["step_times_s"]) == 2 and all(t > 0 for t in r["step_times_s"])
        assert r["images_per_s"] == pytest.approx(8 * r["steps_per_s"])
        assert r["command"].startswith("deepspeed --num_gpus 1 train.py ") and "--global-batch-size 8" in r["command"]
    assert meta["reference_rows"] == {"ratio": "original_math", "ratio_sdpa": "original_sdpa"}
    assert rows[0]["ratio"] == pytest.approx(1.0) and rows[1]["ratio_sdpa"] == pytest.approx(1.0)
    by_key = {r["key"]: r for r in rows}
    assert (by_key["original_math"]["attn_backend"], by_key["original_sdpa"]["attn_backend"]) == ("math", "sdpa")
    assert by_key["ckpt_mp_feat"]["precision"] == "bf16" and by_key["ckpt_mp_feat"]["grad_ckpt"] == "full"
    assert meta["train_flops_per_image"] == 3 * meta["forward_flops_per_image"] > 0


def test_gradient_checkpointing_lowers_measured_memory(table):
    _, rows, _, _ = table
    by_key = {r["key"]: r for r in rows}
    assert by_key["ckpt"]["peak_bytes"] < by_key["original_sdpa"]["peak_bytes"]
    # Same model, optimizer and VAE: the state at the step's start is the same, only the activations differ.
    assert by_key["ckpt"]["start_bytes"] == by_key["original_sdpa"]["start_bytes"]


def test_files_name_device_versions_commit_and_date(table):
    table_module, rows, meta, out = table
    stem = f"table-cpu-{meta['date']}"
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{stem}.{ext}" for ext in ("csv", "json", "md"))
    data = json.loads((out / f"{stem}.json").read_text())
    for key in ("device", "torch", "triton", "deepspeed", "git_commit", "date", "model", "batch", "steps"):
        assert data["meta"][key] not in (None, ""), key
    assert data["meta"]["model"] == "tiny" and data["meta"]["batch"] == 8
    assert [r["key"] for r in data["rows"]] == [r["key"] for r in rows]
    markdown = (out / f"{stem}.md").read_text()
    assert meta["device"] in markdown and "| steps/s |" in markdown.replace("| steps/s | images/s", "| steps/s |")
    assert sum(line.startswith("|") for line in markdown.splitlines()) == 2 + len(rows)  # header, rule, rows
    assert sum(line.startswith("- ") and "train.py" in line for line in markdown.splitlines()) == len(rows)
    csv_lines = (out / f"{stem}.csv").read_text().splitlines()
    assert csv_lines[0].startswith("#") and csv_lines[1].startswith("key,label,")
    assert len(csv_lines) == 2 + len(rows)
