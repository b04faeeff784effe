"""adaLN elementwise kernels at DiT-XL/2's (N, T, D) = (128, 256, 1152), bf16, on one GPU.

Each op is timed for our Triton kernels, eager PyTorch (DiT's own code path) and torch.compile of that
code, in the same run. extra_info holds the GPU time from ``triton.testing.do_bench`` (CUDA events, L2
flushed, median) in microseconds and the achieved bandwidth ``GB/s = ideal bytes / time``, where the
ideal bytes are what the op must read and write once (the same count for every implementation):
    modulated LN fwd: x in, out          -> 2 tensors     bwd: x, dout in, dx out           -> 3
    gated residual fwd: x, y in, h out   -> 3             bwd: dh, y in, dy out (dx = dh)   -> 3
    residual+norm fwd: x, y in, h, m out -> 4             bwd: dh, dm, h, y in, dx, dy out  -> 6
(+ the (N, D) vectors and fp32 row statistics). pytest-benchmark's own columns are wall-clock times of
one call + synchronize. ``test_tile_sweep`` times the launchers alone (no autograd, no custom-op
dispatch) with several (rows per tile, warps) choices, the defaults among them: the kernels' own time,
and the data to retune launch_config on new hardware. The autograd rows of the Triton ops can be
host-bound (Python custom-op dispatch + launch, ~0.1 ms) where the kernels take less than that.
No speed is asserted. Run:
    pytest benchmarks/test_bench_adaln.py --benchmark-json benchmarks/results/adaln-<gpu>.json
"""
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, T, D = 128, 256, 1152
DEVICE = "cuda"
DTYPE = torch.bfloat16
EPS = 1e-6
IMPLS = ("triton", "eager", "compile")


# DiT's unfused code path (dit_fast.dispatch's "torch" backend), written out so this file stands alone
def torch_modulated_layer_norm(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def torch_gated_residual(x, gate, y):
    return x + gate.unsqueeze(1) * y


def torch_gated_residual_norm(x, gate, y, shift, scale):
    h = torch_gated_residual(x, gate, y)
    return h, torch_modulated_layer_norm(h, shift, scale)


def triton_ops():
    from dit_fast_kernels.gated_residual import gated_residual, gated_residual_norm
    from dit_fast_kernels.modulated_layer_norm import modulated_layer_norm
    return {"mln": lambda x, shift, scale: modulated_layer_norm(x, shift, scale, EPS),
            "gr": gated_residual,
            "grn": lambda x, gate, y, shift, scale: gated_residual_norm(x, gate, y, shift, scale, EPS)}


TORCH_OPS = {"mln": torch_modulated_layer_norm, "gr": torch_gated_residual, "grn": torch_gated_residual_norm}


@functools.cache
def op_function(op, impl):
    if impl == "triton":
        return triton_ops()[op]
    if impl == "compile":
        return torch.compile(TORCH_OPS[op], fullgraph=True)
    return TORCH_OPS[op]


def make_inputs(op, requires_grad):
    """Tokens (N, T, D) and adaLN vectors as chunks of one (N, 6D) tensor, as in a DiT block."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x, y = (torch.randn(N, T, D, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(2))
    ada = 0.1 * torch.randn(N, 6 * D, device=DEVICE, dtype=DTYPE, generator=g)
    leaves = [t.requires_grad_(requires_grad) for t in (x, y, ada)]

    def call(fn):
        shift, scale, gate = ada[:, :D], ada[:, D:2 * D], ada[:, 2 * D:3 * D]
        if op == "mln":
            return fn(x, shift, scale)
        if op == "gr":
            return fn(x, gate, y)
        return fn(x, gate, y, shift, scale)

    return leaves, call


def ideal_bytes(op, direction):
    tensors = {("mln", "fwd"): 2, ("mln", "bwd"): 3, ("gr", "fwd"): 3, ("gr", "bwd"): 3,
               ("grn", "fwd"): 4, ("grn", "bwd"): 6}[(op, direction)]
    vectors = {"mln": 2, "gr": 1, "grn": 3}[op] * (1 if direction == "fwd" else 2)  # read (+ grad write)
    row_stats = 0 if op == "gr" else 2 * N * T * 4  # mean, rstd fp32 (written fwd, read bwd)
    elem = torch.finfo(DTYPE).bits // 8
    return tensors * N * T * D * elem + vectors * N * D * elem + row_stats


def measure(benchmark, run, op, direction, impl):
    """GPU time by do_bench into extra_info; pytest-benchmark times call + synchronize."""
    import triton.testing

    run()  # compile / autotune / first-launch costs stay out of the numbers
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
    nbytes = ideal_bytes(op, direction)
    benchmark.group = f"adaln {op} {direction} {N}x{T}x{D} bf16"
    benchmark.extra_info.update(
        op=op, direction=direction, impl=impl, shape=[N, T, D], dtype=str(DTYPE), us=ms * 1e3,
        bytes=nbytes, gb_per_s=nbytes / (ms * 1e-3) / 1e9, gpu=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=triton.__version__,
    )

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=50, iterations=1, warmup_rounds=5)
    print(f"{op} {direction} {impl}: {ms * 1e3:.1f} us, {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["mln", "gr", "grn"])
def test_forward(benchmark, op, impl):
    _, call = make_inputs(op, requires_grad=False)
    fn = op_function(op, impl)
    with torch.no_grad():
        measure(benchmark, lambda: call(fn), op, "fwd", impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["mln", "gr", "grn"])
def test_backward(benchmark, op, impl):
    leaves, call = make_inputs(op, requires_grad=True)
    outs = call(op_function(op, impl))
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    measure(benchmark, lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True,
                                                       allow_unused=True), op, "bwd", impl)


# (rows per tile, warps) per op and direction; the launch_config defaults at D = 1152 are among them
SWEEP = {"mln": {"fwd": [(2, 4), (4, 4), (4, 8)], "bwd": [(1, 4), (1, 8), (2, 8)]},
         "grn": {"fwd": [(2, 4), (4, 4), (4, 8)], "bwd": [(1, 8), (2, 4), (2, 8)]},
         "gr": {"fwd": [(4, 4)], "bwd": [(2, 4)]}}


def sweep_cases():
    for op, directions in SWEEP.items():
        for direction, tiles in directions.items():
            for block_t, num_warps in tiles:
                yield pytest.param(op, direction, block_t, num_warps, id=f"{op}-{direction}-T{block_t}w{num_warps}")


def launcher_call(op, direction, tiles):
    """A no-autograd call of one Triton launcher with forced tiles."""
    # the package re-exports the functions under the modules' names: fetch the modules themselves
    gr = importlib.import_module("dit_fast_kernels.gated_residual")
    mln = importlib.import_module("dit_fast_kernels.modulated_layer_norm")

    (x, y, ada), _ = make_inputs(op, requires_grad=False)
    shift, scale, gate = ada[:, :D], ada[:, D:2 * D], ada[:, 2 * D:3 * D]
    dh, dm = torch.randn_like(x), torch.randn_like(x)
    if op == "mln":
        if direction == "fwd":
            return lambda: mln.modulated_layer_norm_fwd(x, shift, scale, EPS, **tiles)
        _, mean, rstd = mln.modulated_layer_norm_fwd(x, shift, scale, EPS)
        return lambda: mln.modulated_layer_norm_bwd(dm, x, scale, mean, rstd, **tiles)
    if op == "gr":
        if direction == "fwd":
            return lambda: gr.gated_residual_fwd(x, gate, y, **tiles)
        return lambda: gr.gated_residual_bwd(dh, gate, y, **tiles)
    if direction == "fwd":
        return lambda: gr.gated_residual_norm_fwd(x, gate, y, shift, scale, EPS, **tiles)
    h, _, mean, rstd = gr.gated_residual_norm_fwd(x, gate, y, shift, scale, EPS)
    return lambda: gr.gated_residual_norm_bwd(dh, dm, h, gate, y, scale, mean, rstd, **tiles)


@pytest.mark.parametrize("op,direction,block_t,num_warps", list(sweep_cases()))
def test_tile_sweep(benchmark, op, direction, block_t, num_warps):
    run = launcher_call(op, direction, dict(block_t=block_t, num_warps=num_warps))
    measure(benchmark, run, op, direction, f"triton-T{block_t}-w{num_warps}")
