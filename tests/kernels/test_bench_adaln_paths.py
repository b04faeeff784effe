"""benchmarks/test_bench_adaln.py's Python paths on the CPU: every implementation of every op, forward and
backward, and the launcher sweeps, at a tiny shape in Triton's interpreter with the GPU timer stubbed
(the suite itself skips without CUDA, so nothing else would run this code before a GPU session).
No timing is checked: only that each case builds its inputs, calls its function and counts its bytes.
"""
import importlib
import pathlib
import sys

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
bench = importlib.import_module("test_bench_adaln")


class FakeBenchmark:
    def __init__(self):
        self.extra_info, self.group = {}, None

    def pedantic(self, fn, **kwargs):
        fn()


@pytest.fixture
def cpu_bench(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU, run the suite itself")
    monkeypatch.setattr(bench, "N", 2)
    monkeypatch.setattr(bench, "T", 5)
    monkeypatch.setattr(bench, "D", 72)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "device_time_ms", lambda run: (run(), (1.0, "stub"))[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "cpu (stub)")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    bench.op_function.cache_clear()
    yield bench
    bench.op_function.cache_clear()


@pytest.mark.parametrize("op", bench.OPS)
def test_every_case_of_an_op_runs(cpu_bench, op):
    cases = 0
    for param in bench.impl_cases():
        if param.values[0] == op and param.values[1] == "fp32-stream":
            cpu_bench.test_forward(FakeBenchmark(), *param.values)
            b = FakeBenchmark()
            cpu_bench.test_forward_backward(b, *param.values)
            assert b.extra_info["bytes"] == cpu_bench.ideal_bytes(op, "fwd+bwd", "fp32-stream") > 0
            cases += 1
    for param in bench.backward_cases():
        if param.values[0] == op:
            cpu_bench.test_backward_launcher(FakeBenchmark(), *param.values)
    for param in bench.sweep_cases():
        if param.values[0] == op:
            cpu_bench.test_tile_sweep(FakeBenchmark(), *param.values)
    assert cases == len(bench.impls(op, "fp32-stream"))
