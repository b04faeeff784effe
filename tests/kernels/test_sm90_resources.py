"""The adaLN kernels' default launch configs compile for sm_90 without register spills (no GPU needed).

A spill turns register traffic into local-memory traffic in a memory-bound kernel; the configs in
adaln_tiles.py were picked from this compile (tests/kernels/sm90_resources.py prints the whole
table). The compile runs in a subprocess because this test session interprets the
kernels (TRITON_INTERPRET=1), and interpreted kernels cannot be compiled.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton_spec = importlib.util.find_spec("triton")
BIN = pathlib.Path(triton_spec.origin).parent / "backends" / "nvidia" / "bin" if triton_spec else None
pytestmark = pytest.mark.skipif(BIN is None or not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                                reason="needs triton with its bundled ptxas and cuobjdump")
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("x_dtype", ["fp32", "bf16"])
def test_default_configs_do_not_spill_at_d1152(x_dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "kernels" / "sm90_resources.py"), "--json",
                           "--x-dtype", x_dtype], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["layout"]) for r in rows} == {(k, lay) for k in ("mln_fwd", "mln_bwd", "grn_fwd", "grn_bwd")
                                                          for lay in ("tiles", "rows")}
    spills = [r for r in rows if r["stack"] > 0]
    assert not spills, f"default configs spill registers on sm_90: {spills}"
    # the rows forward holds a row in one warp: its reductions need no block barrier
    assert all(r["bar_sync"] == 0 for r in rows if (r["kernel"], r["layout"]) == ("mln_fwd", "rows"))
