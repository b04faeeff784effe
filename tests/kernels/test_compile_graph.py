"""torch.compile records the adaLN ops' Triton kernels themselves (triton_op + wrap_triton), not an
opaque call: AOTAutograd's forward graph of a CUDA call holds ``triton_kernel_wrapper_functional``
nodes, which inductor then schedules (and fuses around) like its own kernels.

Checked on a CPU-only machine by tracing with fake CUDA tensors (nothing runs; the graph is only
built; triton is told the target, sm_90, so torch can build the kernels' TTIR for its mutation
analysis) in a subprocess without TRITON_INTERPRET, since interpreted kernels are not JIT functions
and take the reference path when traced. Forward graphs only: the CPU build of torch has no CUDA device
guard for the autograd engine. On a GPU, test_gpu_torch_compile_inductor runs the compiled op instead.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r'''
import importlib, json, sys
import torch
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode

import triton
from triton.backends.compiler import GPUTarget


class TargetOnlyDriver:  # what torch asks the driver while tracing: the target to build TTIR for
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(TargetOnlyDriver())
tiles = importlib.import_module("dit_fast_kernels.adaln_tiles")
tiles._sm_count = lambda device_type, index: 132  # no CUDA runtime to ask (H100/H200 have 132 SMs)
import dit_fast_kernels as k

def graph_of(fn, *shapes_dtypes):
    codes = []
    def keep(gm, example_inputs):
        codes.append(gm.code)
        return gm
    with FakeTensorMode():
        args = [torch.empty(shape, device="cuda", dtype=dtype) for shape, dtype in shapes_dtypes]
        try:
            aot_function(fn, fw_compiler=keep)(*args)
        except RuntimeError:  # running the traced graph needs a CUDA build; tracing does not
            pass
    return codes[0]

tok, vec = ((2, 8, 1152), torch.float32), ((2, 1152), torch.bfloat16)
out = {}
for layout in ("tiles", "rows"):
    out[f"mln-{layout}"] = graph_of(lambda x, s, c: k.modulated_layer_norm(x, s, c, out_dtype=torch.bfloat16,
                                                                          layout=layout), tok, vec, vec)
    out[f"grn-{layout}"] = graph_of(lambda x, g, y, s, c: k.gated_residual_norm(x, g, y, s, c,
                                                                               out_dtype=torch.bfloat16, layout=layout),
                                    tok, vec, tok, vec, vec)
out["gr"] = graph_of(lambda x, g, y: k.gated_residual(x, g, y), tok, vec, tok)
print("GRAPHS=" + json.dumps(out))
from torch._library.triton import get_triton_kernels_for_op
ops = ("modulated_layer_norm", "gated_residual", "gated_residual_norm")
found = {f"{op}{part}": sorted(kern.fn.__name__ for kern in get_triton_kernels_for_op(f"dit_fast::{op}{part}"))
         for op in ops for part in ("", "_backward")}
print("KERNELS=" + json.dumps(found))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, test_gpu_torch_compile_inductor compiles for real")
def test_compiled_graph_holds_the_triton_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("GRAPHS=")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    graphs = json.loads(lines[0][len("GRAPHS="):])
    # the kernels torch found in each op's body (AOTAutograd's cache key hashes their source): both
    # layouts' kernels of every op
    kernels = json.loads([line for line in done.stdout.splitlines() if line.startswith("KERNELS=")][0][8:])
    want = {"modulated_layer_norm": 2, "modulated_layer_norm_backward": 2, "gated_residual": 1,
            "gated_residual_backward": 1, "gated_residual_norm": 2, "gated_residual_norm_backward": 2}
    assert {op: len(names) for op, names in kernels.items()} == want, kernels
    for name, code in graphs.items():
        assert "triton_kernel_wrapper_functional" in code, f"{name}: no Triton kernel in the graph:\n{code}"
        assert "dit_fast." not in code, f"{name}: the op stayed opaque:\n{code}"
        # torch's mutation analysis (from the kernels' TTIR) sees that only the outputs are written: an
        # input marked as mutated would make inductor copy it before every launch
        groups = re.findall(r"tensors_to_clone = \[([^]]*)\]", code)
        cloned = {n for group in groups for n in re.findall(r"'(\w+)'", group)}
        assert cloned and not cloned & {"X", "GATE", "Y", "SHIFT", "SCALE"}, f"{name}: inputs copied: {cloned}"
