"""adaLN elementwise kernels at DiT-XL/2's (N, T, D) = (128, 256, 1152) on one GPU: device time and GB/s.

Each op is timed for our Triton kernels (each ``layout``; m written directly in the GEMM dtype or cast
afterwards), eager PyTorch (DiT's own code path) and torch.compile of that code, in the same run, in
two precisions:
    bf16          x, y, adaLN vectors and m all bf16 (the kernel targets' case)
    fp32-stream   the model under autocast: fp32 residual stream x (and h), bf16 y and adaLN vectors,
                  m needed in bf16 by the next GEMM. "triton-<layout>" writes bf16 m itself
                  (out_dtype=bf16) and takes a bf16 dm; "triton-tiles-cast" is today's model path
                  (fp32 m, then autocast's separate cast kernel, and its mirror in the backward).
extra_info holds the device time in microseconds (median) from ``triton.testing.do_bench_cudagraph``:
the timed call is captured in a CUDA graph, so host dispatch (Python, custom-op dispatch, launch) is
excluded and only the kernels count (falls back to ``do_bench``, CUDA events, if capture fails; the
``timer`` field says which). GB/s = ideal bytes / time, where the ideal bytes are what the op must read
and write once with m in its final dtype -- the same count for every implementation:
    modulated LN fwd: x in, m out                 bwd: x, dm in, dx out
    gated residual fwd: x, y in, h out            bwd: dh, y in, dy out (dx = dh)
    residual+norm fwd: x, y in, h, m out          bwd: dh, dm, h, y in, dx, dy out
(+ the (N, D) vectors and the fp32 row statistics). Directions: ``fwd`` (no grad), ``fwd+bwd`` (the
op's share of a training step, forward and autograd backward in one captured call) and, for our
kernels, ``bwd`` (the backward launcher alone). ``test_tile_sweep`` times the launchers alone with
several tilings of both layouts, the defaults among them: the data to choose DEFAULT_LAYOUT and
retune the configs. pytest-benchmark's own columns are wall-clock times of one call + synchronize
(host overhead included). No speed is asserted. Run:
    pytest benchmarks/test_bench_adaln.py --benchmark-json benchmarks/results/adaln-<gpu>.json
pytest-benchmark writes its JSON only when the session ends; with ADALN_BENCH_JSONL=<file> each case's
extra_info is also appended to <file> as it finishes, so a run cut short by a timeout keeps what it
measured. Subsets by test id, e.g. ``-k "not sweep"`` (~60 cases) or ``-k "fp32-stream"``.
"""
import datetime
import functools
import importlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, T, D = 128, 256, 1152
DEVICE = "cuda"
EPS = 1e-6
# name: (x / residual-stream dtype, y and adaLN-vector dtype, m dtype)
PRECISIONS = {"bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
              "fp32-stream": (torch.float32, torch.bfloat16, torch.bfloat16)}
LAYOUTS = ("tiles", "rows")  # dit_fast_kernels.modulated_layer_norm.LAYOUTS (not imported: collects without triton)
OPS = ("mln", "gr", "grn")


def kernel_modules():
    # the package re-exports the functions under the modules' names: fetch the modules themselves
    return (importlib.import_module("dit_fast_kernels.modulated_layer_norm"),
            importlib.import_module("dit_fast_kernels.gated_residual"),
            importlib.import_module("dit_fast_kernels.gated_residual_norm"))


# DiT's unfused code path (dit_fast.dispatch's "torch" backend), written out so this file stands alone
def torch_modulated_layer_norm(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def torch_gated_residual(x, gate, y):
    return x + gate.unsqueeze(1) * y


def torch_gated_residual_norm(x, gate, y, shift, scale):
    h = torch_gated_residual(x, gate, y)
    return h, torch_modulated_layer_norm(h, shift, scale)


TORCH_OPS = {"mln": torch_modulated_layer_norm, "gr": torch_gated_residual, "grn": torch_gated_residual_norm}


def cast_m(op, outs, m_dtype):
    """What autocast does before the next GEMM: m (the norm's output) cast to the GEMM dtype."""
    if op == "mln":
        return outs.to(m_dtype)
    if op == "grn":
        return outs[0], outs[1].to(m_dtype)
    return outs


def impls(op, precision):
    names = ["eager", "compile"]
    if op == "gr":
        return ["triton"] + names
    names = [f"triton-{layout}" for layout in LAYOUTS] + names
    return names + (["triton-tiles-cast"] if precision == "fp32-stream" else [])


def impl_cases():
    for op in OPS:
        for precision in PRECISIONS:
            for impl in impls(op, precision):
                yield pytest.param(op, precision, impl, id=f"{op}-{precision}-{impl}")


@functools.cache
def op_function(op, precision, impl):
    """fn(x, gate, y, shift, scale) -> the op's outputs, m in the precision's m dtype."""
    m_dtype = PRECISIONS[precision][2]
    if impl.startswith("triton"):
        mln, gr, grn = kernel_modules()
        layout = impl.split("-")[1] if op != "gr" else None
        out_dtype = None if impl.endswith("-cast") else m_dtype
        ours = {"mln": lambda x, gate, y, shift, scale: mln.modulated_layer_norm(x, shift, scale, EPS, out_dtype,
                                                                                  layout),
                "gr": lambda x, gate, y, shift, scale: gr.gated_residual(x, gate, y),
                "grn": lambda x, gate, y, shift, scale: grn.gated_residual_norm(x, gate, y, shift, scale, EPS,
                                                                                 out_dtype, layout)}[op]
        return lambda *a: cast_m(op, ours(*a), m_dtype)

    eager = eager_function(op, m_dtype)
    return torch.compile(eager, fullgraph=True) if impl == "compile" else eager


def eager_function(op, m_dtype):
    """DiT's torch code as fn(x, gate, y, shift, scale), m then cast as autocast would. One code object
    per op: dynamo's recompile limit (8) counts per code object, and each op compiles 2 precisions x
    (grad, no grad)."""
    if op == "mln":
        return lambda x, gate, y, shift, scale: torch_modulated_layer_norm(x, shift, scale).to(m_dtype)
    if op == "gr":
        return lambda x, gate, y, shift, scale: torch_gated_residual(x, gate, y)

    def grn(x, gate, y, shift, scale):
        h, m = torch_gated_residual_norm(x, gate, y, shift, scale)
        return h, m.to(m_dtype)

    return grn


def make_inputs(precision, requires_grad):
    """x, y (N, T, D) and gate/shift/scale as chunks of one (N, 6D) adaLN output, as in a DiT block."""
    x_dtype, v_dtype, _ = PRECISIONS[precision]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(N, T, D, device=DEVICE, generator=g).to(x_dtype)
    y = torch.randn(N, T, D, device=DEVICE, generator=g).to(v_dtype)
    ada = (0.1 * torch.randn(N, 6 * D, device=DEVICE, generator=g)).to(v_dtype)
    leaves = [t.requires_grad_(requires_grad) for t in (x, y, ada)]
    x, y, ada = leaves
    return leaves, (x, ada[:, 2 * D:3 * D], y, ada[:, :D], ada[:, D:2 * D])


def ideal_bytes(op, direction, precision):
    """Bytes the op must move once (module docstring); m in its final dtype."""
    x_b, v_b, m_b = (torch.finfo(dt).bits // 8 for dt in PRECISIONS[precision])
    tokens, vec = N * T * D, N * D
    stats = 0 if op == "gr" else 2 * N * T * 4  # mean, rstd fp32 (written fwd, read bwd)
    fwd = {"mln": tokens * (x_b + m_b) + 2 * vec * v_b,
           "gr": tokens * (x_b + v_b + x_b) + vec * v_b,
           "grn": tokens * (x_b + v_b + x_b + m_b) + 3 * vec * v_b}[op] + stats
    bwd = {"mln": tokens * (x_b + m_b + x_b) + 3 * vec * v_b,
           "gr": tokens * (x_b + v_b + v_b) + 2 * vec * v_b,
           "grn": tokens * (x_b + m_b + x_b + v_b + x_b + v_b) + 5 * vec * v_b}[op] + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def device_time_ms(run):
    """(median ms, timer): CUDA-graph replay (no host overhead), or CUDA events if capture fails."""
    import triton.testing

    run()  # compile / autotune / first-launch costs stay out of the numbers
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median"), "do_bench_cudagraph"
    except Exception as err:  # noqa: BLE001 - a path that cannot be captured: time it with events instead
        torch.cuda.synchronize()
        return (triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median"),
                f"do_bench (capture failed: {type(err).__name__})")


def measure(benchmark, run, op, direction, precision, impl):
    import triton

    ms, timer = device_time_ms(run)
    nbytes = ideal_bytes(op, direction, precision)
    benchmark.group = f"adaln {op} {direction} {N}x{T}x{D} {precision}"
    benchmark.extra_info.update(
        op=op, direction=direction, precision=precision, impl=impl, shape=[N, T, D], us=ms * 1e3,
        bytes=nbytes, gb_per_s=nbytes / (ms * 1e-3) / 1e9, timer=timer, gpu=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=triton.__version__, commit=os.environ.get("DIT_FAST_COMMIT", "unknown"),
        date=datetime.date.today().isoformat(),
    )

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
    if os.environ.get("ADALN_BENCH_JSONL"):
        with open(os.environ["ADALN_BENCH_JSONL"], "a") as f:
            f.write(json.dumps(benchmark.extra_info) + "\n")
    print(f"{op} {direction} {precision} {impl}: {ms * 1e3:.1f} us, {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s ({timer})")


@pytest.mark.parametrize("op,precision,impl", list(impl_cases()))
def test_forward(benchmark, op, precision, impl):
    _, args = make_inputs(precision, requires_grad=False)
    fn = op_function(op, precision, impl)

    def run():
        with torch.no_grad():
            return fn(*args)

    measure(benchmark, run, op, "fwd", precision, impl)


@pytest.mark.parametrize("op,precision,impl", list(impl_cases()))
def test_forward_backward(benchmark, op, precision, impl):
    """Forward + autograd backward in one call (captured whole, so the backward runs on the capture stream)."""
    leaves, args = make_inputs(precision, requires_grad=True)
    fn = op_function(op, precision, impl)
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def run():
        res = fn(*args)
        return torch.autograd.grad(res if isinstance(res, tuple) else (res,), leaves, grads, allow_unused=True)

    measure(benchmark, run, op, "fwd+bwd", precision, impl)


def launcher_call(op, direction, precision, layout=None, out_dtype="final", **tiles):
    """A no-autograd call of one Triton launcher (``out_dtype="final"``: m in the precision's m dtype)."""
    mln, gr, grn = kernel_modules()
    _, (x, gate, y, shift, scale) = make_inputs(precision, requires_grad=False)
    m_dtype = PRECISIONS[precision][2] if out_dtype == "final" else out_dtype
    dh, dm = torch.randn_like(x), torch.randn(x.shape, device=DEVICE, dtype=m_dtype or x.dtype)
    if op == "mln":
        if direction == "fwd":
            return lambda: mln.modulated_layer_norm_fwd(x, shift, scale, EPS, m_dtype, layout, **tiles)
        _, mean, rstd = mln.modulated_layer_norm_fwd(x, shift, scale, EPS)
        return lambda: mln.modulated_layer_norm_bwd(dm, x, scale, mean, rstd, layout, **tiles)
    if op == "gr":
        if direction == "fwd":
            return lambda: gr.gated_residual_fwd(x, gate, y, **tiles)
        return lambda: gr.gated_residual_bwd(dh, gate, y, **tiles)
    if direction == "fwd":
        return lambda: grn.gated_residual_norm_fwd(x, gate, y, shift, scale, EPS, m_dtype, layout, **tiles)
    h, _, mean, rstd = grn.gated_residual_norm_fwd(x, gate, y, shift, scale, EPS)
    return lambda: grn.gated_residual_norm_bwd(dh, dm, h, gate, y, scale, mean, rstd, layout, **tiles)


def backward_cases():
    for op in OPS:
        for precision in PRECISIONS:
            for layout in (LAYOUTS if op != "gr" else (None,)):
                yield pytest.param(op, precision, layout, id=f"{op}-{precision}-{layout or 'tiles'}")


@pytest.mark.parametrize("op,precision,layout", list(backward_cases()))
def test_backward_launcher(benchmark, op, precision, layout):
    """The backward kernel(s) alone, dm in the m dtype (what the forward's out_dtype hands back)."""
    measure(benchmark, launcher_call(op, "bwd", precision, layout), op, "bwd", precision,
            f"triton-{layout or 'tiles'}")


# tilings per (op, direction): ("tiles", rows per tile, warps) / ("rows", programs per SM, warps); the
# defaults at D = 1152 come first per layout (tiles: fwd T4w4, mln bwd T1w8, grn bwd T2w4; rows: the
# ROWS_* configs: mln fwd P16w1, grn fwd P8w2, backward P4w2)
SWEEP = {"mln": {"fwd": [("tiles", 2, 4), ("tiles", 4, 4), ("tiles", 4, 8), ("rows", 16, 1), ("rows", 8, 1),
                         ("rows", 32, 1), ("rows", 8, 2)],
                 "bwd": [("tiles", 1, 4), ("tiles", 1, 8), ("tiles", 2, 8), ("rows", 4, 2), ("rows", 8, 2),
                         ("rows", 8, 1), ("rows", 4, 4)]},
         "grn": {"fwd": [("tiles", 2, 4), ("tiles", 4, 4), ("tiles", 4, 8), ("rows", 8, 2), ("rows", 16, 1),
                         ("rows", 8, 4)],
                 "bwd": [("tiles", 1, 8), ("tiles", 2, 4), ("tiles", 2, 8), ("rows", 4, 2), ("rows", 8, 2),
                         ("rows", 4, 4), ("rows", 8, 1)]},
         "gr": {"fwd": [("tiles", 4, 4)], "bwd": [("tiles", 2, 4)]}}
# (rows P8w1 in the backward spills on sm_90, tests/kernels/sm90_resources.py: measured to see what it costs)


def sweep_cases():
    for op, directions in SWEEP.items():
        for direction, tilings in directions.items():
            for layout, knob, num_warps in tilings:
                name = f"T{knob}w{num_warps}" if layout == "tiles" else f"P{knob}w{num_warps}"
                yield pytest.param(op, direction, layout, knob, num_warps, id=f"{op}-{direction}-{layout}-{name}")


@pytest.mark.parametrize("op,direction,layout,knob,num_warps", list(sweep_cases()))
def test_tile_sweep(benchmark, op, direction, layout, knob, num_warps):
    """bf16 launchers with forced tilings: ``knob`` is rows per tile (tiles) or programs per SM (rows)."""
    tiles = (dict(block_t=knob, num_warps=num_warps) if layout == "tiles"
             else dict(programs_per_sm=knob, num_warps=num_warps))
    run = launcher_call(op, direction, "bf16", layout if op != "gr" else None, **tiles)
    name = f"T{knob}-w{num_warps}" if layout == "tiles" else f"P{knob}-w{num_warps}"
    measure(benchmark, run, op, direction, "bf16", f"triton-{layout}-{name}")
