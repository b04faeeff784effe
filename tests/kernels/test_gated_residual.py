"""Gated residual x + gate * y (gated_residual.py), and its fusion with the next modulated LayerNorm
(gated_residual_norm.py), vs the reference. One file for both ops: they share inputs, checks and tests.

CPU: Triton's interpreter (fp32, fp16), tiny adversarial shapes. GPU: bf16/fp16/fp32 at DiT-XL's
(128, 256, 1152) and an odd shape. Error rule (flash-attention's): err(kernel in dtype vs float64
gold) <= 2 * err(torch reference in dtype vs gold) + a small floor. Every gradient is checked, for both
layouts of the fused op and with m written in the GEMM dtype (out_dtype).
"""
import functools
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of dit_fast_kernels / triton
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")  # only with DIT_FAST_ALLOW_NO_TRITON=1: conftest fails without it

from tests.kernels.rule import DEVICE, FLOOR, TINY_TILES, assert_rule  # noqa: E402,F401

from dit_fast_kernels.gated_residual import (  # noqa: E402
    gated_residual, gated_residual_bwd, gated_residual_fwd, gated_residual_ref,
)
from dit_fast_kernels.gated_residual_norm import (  # noqa: E402
    gated_residual_norm, gated_residual_norm_bwd, gated_residual_norm_fwd, gated_residual_norm_ref,
)
from dit_fast_kernels.modulated_layer_norm import LAYOUTS, modulated_layer_norm  # noqa: E402

# the package re-exports the functions under the modules' names: fetch the modules themselves
gr_module = importlib.import_module("dit_fast_kernels.gated_residual")
grn_module = importlib.import_module("dit_fast_kernels.gated_residual_norm")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NAMES = ("h", "m", "dx", "dgate", "dy", "dshift", "dscale")


def make_inputs(N, T, D, dtype, device=DEVICE, ada_dtype=None, seed=0):
    """x, y, dh, dm (N, T, D); gate/shift/scale: non-contiguous chunks of an (N, 6D) adaLN output."""
    g = torch.Generator(device=device).manual_seed(seed)
    x, y, dh, dm = (torch.randn(N, T, D, generator=g, device=device).to(device, dtype) for _ in range(4))
    ada = (0.5 * torch.randn(N, 6 * D, generator=g, device=device)).to(device, ada_dtype or dtype)
    return dict(x=x, gate=ada[:, 2 * D:3 * D], y=y, shift=ada[:, :D], scale=ada[:, D:2 * D], dh=dh, dm=dm)


def grads_of(fn, inp, names=("x", "gate", "y", "shift", "scale")):
    """fn's outputs and the gradients of <h, dh> + <m, dm> w.r.t. ``names``, via autograd."""
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in names}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * inp[k]).sum() for o, k in zip(outs, ("dh", "dm")))
    loss.backward()
    return [o.detach() for o in outs] + [leaves[k].grad for k in names]


def fused_ref(upcast=True, out_dtype=None):
    """The reference; in the inputs' dtype (upcast=False) its m is then cast to out_dtype, as autocast would."""
    def ref(x, gate, y, shift, scale):
        h, m = gated_residual_norm_ref(x, gate, y, shift, scale, 1e-6, upcast)
        return h, (m if upcast else m.to(out_dtype or m.dtype))
    return ref


def residual_ref(upcast=True):
    return lambda x, gate, y: gated_residual_ref(x, gate, y, upcast)


def check(fn, ref, inp, names, labels, dtype):
    """Each output and gradient under the rule (with the floor of ``dtype``, the inputs')."""
    gold = grads_of(ref(True), {k: v.double() for k, v in inp.items()}, names)
    base = grads_of(ref(False), inp, names)
    for label, o, g, b in zip(labels, grads_of(fn, inp, names) if callable(fn) else fn, gold, base):
        assert o.dtype == b.dtype and o.shape == g.shape, f"{label}: {o.dtype} {tuple(o.shape)}"
        assert_rule(label, o, g, b, dtype)


def launch_fused(inp, tiles, layout=None, out_dtype=None):
    """(h, m, dx, dgate, dy, dshift, dscale) from the launchers, with forced tiles."""
    h, m, mean, rstd = gated_residual_norm_fwd(*(inp[k] for k in ("x", "gate", "y", "shift", "scale")), 1e-6,
                                               out_dtype, layout, **tiles)
    dx, dy, dgate, dshift, dscale = gated_residual_norm_bwd(inp["dh"], inp["dm"], h, inp["gate"], inp["y"],
                                                            inp["scale"], mean, rstd, layout, **tiles)
    return [h, m, dx, dgate, dy, dshift, dscale]


def check_fused(inp, tiles=None, layout=None, out_dtype=None):
    """The fused op vs the reference; dm is handed over in out_dtype, as autograd would."""
    if out_dtype is not None:
        inp = {**inp, "dm": inp["dm"].to(out_dtype)}
    if tiles is None:
        def fn(**kw):
            return gated_residual_norm(**kw, out_dtype=out_dtype, layout=layout)
    else:
        fn = launch_fused(inp, tiles, layout, out_dtype)
    check(fn, lambda upcast: fused_ref(upcast, out_dtype), inp, ("x", "gate", "y", "shift", "scale"), NAMES,
          inp["x"].dtype)


def check_residual(inp, tiles=None):
    if tiles is None:
        fn = gated_residual
    else:
        dy, dgate = gated_residual_bwd(inp["dh"], inp["gate"], inp["y"], **tiles)
        fn = [gated_residual_fwd(inp["x"], inp["gate"], inp["y"], **tiles), inp["dh"], dgate, dy]
    check(fn, residual_ref, inp, ("x", "gate", "y"), ("h", "dx", "dgate", "dy"), inp["x"].dtype)


# ----------------------------------------------------------------------------------- CPU + GPU

@pytest.mark.parametrize("tiles", [None, TINY_TILES], ids=["default-tiles", "tiny-tiles"])
@pytest.mark.parametrize("shape", [(2, 17, 40), (2, 25, 72)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gated_residual_matches_reference(dtype, shape, tiles):
    check_residual(make_inputs(*shape, dtype), tiles)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiles", [None, TINY_TILES], ids=["default-tiles", "tiny-tiles"])
@pytest.mark.parametrize("shape", [(2, 17, 40), (2, 25, 72)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gated_residual_norm_matches_reference(dtype, shape, tiles, layout):
    check_fused(make_inputs(*shape, dtype), tiles, layout)


@pytest.mark.parametrize("D", [1, 64, 1000], ids=str)
def test_widths_split_into_two_column_blocks(D):
    """Rows are held as a power-of-two block plus a masked one: D = 1, a power of two, 512 + 488."""
    inp = make_inputs(2, 3, D, torch.float32)
    for layout in LAYOUTS:
        check_fused(inp, dict(block_t=2, rows_per_program=2), layout)
    check_residual(inp, dict(block_t=2, rows_per_program=2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dit_width_with_fp16_m(layout):
    """D = 1152 (1024 + 128 column blocks), odd T, default launch, m in fp16."""
    check_fused(make_inputs(2, 5, 1152, torch.float32), layout=layout, out_dtype=torch.float16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiles", [None, dict(block_t=2, rows_per_program=5)], ids=["default-tiles", "odd-chunks"])
def test_out_dtype_writes_the_gemm_input(tiles, layout):
    """fp32 residual stream, m in fp16 (the autocast case): the bits of the kernel's fp32 m cast by
    torch, within the rule of the reference; h and every gradient stay fp32; fp16 dm is upcast in-kernel."""
    inp = make_inputs(3, 13, 96, torch.float32)
    check_fused(inp, tiles, layout, torch.float16)
    args, opts = [inp[k] for k in ("x", "gate", "y", "shift", "scale")], tiles or {}
    h16, m16, mean, rstd = gated_residual_norm_fwd(*args, 1e-6, torch.float16, layout, **opts)
    h32, m32, _, _ = gated_residual_norm_fwd(*args, 1e-6, None, layout, **opts)
    assert h16.dtype == torch.float32 and torch.equal(h16, h32)
    assert m16.dtype == torch.float16 and torch.equal(m16, m32.to(torch.float16))
    dm16 = inp["dm"].half()
    common = (h16, inp["gate"], inp["y"], inp["scale"], mean, rstd, layout)
    for a, b in zip(gated_residual_norm_bwd(inp["dh"], dm16, *common, **opts),
                    gated_residual_norm_bwd(inp["dh"], dm16.float(), *common, **opts)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def autocast_block(inp, out_dtype, layout, device_type="cpu", dtype=torch.float16):
    """h, next GEMM's output and all gradients (weights too) of the fused op feeding a linear under autocast."""
    D = inp["x"].shape[-1]
    w = torch.randn(24, D, generator=torch.Generator().manual_seed(1)).to(inp["x"].device)
    gout = torch.randn(*inp["x"].shape[:2], 24, generator=torch.Generator().manual_seed(2)).to(inp["x"].device)
    names = ("x", "gate", "y", "shift", "scale")
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in names}
    w = w.requires_grad_()
    with torch.autocast(device_type, dtype=dtype):
        h, m = gated_residual_norm(**leaves, out_dtype=out_dtype, layout=layout)
        out = torch.nn.functional.linear(m, w)
    ((out.float() * gout).sum() + (h * inp["dh"]).sum()).backward()
    return [h.detach(), out.detach(), w.grad] + [leaves[k].grad for k in names]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_dtype_equals_autocasts_own_cast(layout):
    """Under autocast, the same bits forward and backward whether the GEMM casts an fp32 m (today)
    or gets m written in fp16 by the kernel (the switch)."""
    inp = make_inputs(2, 7, 40, torch.float32)
    for a, b in zip(autocast_block(inp, None, layout), autocast_block(inp, torch.float16, layout)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_layouts_agree():
    inp = make_inputs(2, 25, 72, torch.float32)
    tiles = grads_of(lambda **kw: gated_residual_norm(**kw, layout="tiles"), inp)
    rows = grads_of(lambda **kw: gated_residual_norm(**kw, layout="rows"), inp)
    for a, b in zip(tiles, rows):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_eager_calls_run_the_kernels(monkeypatch):
    """The triton_ops' eager path launches the Triton kernels (here: interpreted), not the reference."""
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernels")

    for name in ("gated_residual_ref", "_residual_backward_ref"):
        monkeypatch.setattr(gr_module, name, no_reference)
    for name in ("_residual_norm_forward_ref", "_residual_norm_backward_ref"):
        monkeypatch.setattr(grn_module, name, no_reference)
    inp = make_inputs(2, 5, 40, torch.float32)
    grads_of(gated_residual_norm, inp)
    grads_of(gated_residual, inp, ("x", "gate", "y"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gated_residual_norm_when_only_m_is_used(layout):
    """Gradients flow into m only (h unused downstream): the kernel's no-dh path."""
    inp = make_inputs(3, 5, 40, torch.float32)
    inp["dh"] = torch.zeros_like(inp["dh"])
    h, m, mean, rstd = gated_residual_norm_fwd(*(inp[k] for k in ("x", "gate", "y", "shift", "scale")), 1e-6)
    got_none = gated_residual_norm_bwd(None, inp["dm"], h, inp["gate"], inp["y"], inp["scale"], mean, rstd,
                                       layout, block_t=2, rows_per_program=4)
    got_zero = gated_residual_norm_bwd(inp["dh"], inp["dm"], h, inp["gate"], inp["y"], inp["scale"], mean,
                                       rstd, layout, block_t=2, rows_per_program=4)
    for a, b in zip(got_none, got_zero):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    check(lambda **kw: gated_residual_norm(**kw)[1:], lambda up: lambda **kw: fused_ref(up)(**kw)[1:], inp,
          ("x", "gate", "y", "shift", "scale"), NAMES[1:], torch.float32)


def test_fused_equals_unfused_path():
    inp = make_inputs(2, 17, 72, torch.float32)

    def unfused(x, gate, y, shift, scale):
        h = gated_residual(x, gate, y)
        return h, modulated_layer_norm(h, shift, scale)

    for a, b in zip(grads_of(gated_residual_norm, inp), grads_of(unfused, inp)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_follow_torch_promotion():
    """Autocast-style: fp32 residual stream, fp16 adaLN vectors and sublayer output."""
    inp = make_inputs(2, 5, 40, torch.float32, ada_dtype=torch.float16)
    inp["y"] = inp["y"].half()
    check_fused(inp)
    check_residual(inp)
    h, m = gated_residual_norm(*(inp[k] for k in ("x", "gate", "y", "shift", "scale")))
    assert h.dtype == m.dtype == torch.float32


def test_backward_same_bits_twice_in_sequence():
    """Two launches give the same bits: no uninitialised or stale reads. The CPU interpreter runs the
    programs one after another, so it cannot see atomics races; test_gpu_backward_is_deterministic does."""
    inp = make_inputs(2, 25, 40, torch.float32)
    for layout in LAYOUTS:
        first, second = launch_fused(inp, TINY_TILES, layout), launch_fused(inp, TINY_TILES, layout)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    first = gated_residual_bwd(inp["dh"], inp["gate"], inp["y"], **TINY_TILES)
    second = gated_residual_bwd(inp["dh"], inp["gate"], inp["y"], **TINY_TILES)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("out_dtype", [None, torch.float16], ids=str)
def test_torch_compile_fullgraph_forward_and_backward(out_dtype):
    """No graph break through either op, forward and backward (traced on the CPU the bodies become
    the reference's torch ops; on CUDA the graph holds the kernels)."""
    inp = make_inputs(2, 5, 40, torch.float32)

    def block(x, gate, y, shift, scale):
        h, m = gated_residual_norm(x, gate, y, shift, scale, out_dtype=out_dtype, layout="rows")
        return gated_residual(h, gate, m.float().tanh()), m.float()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    tol = dict(rtol=2e-3, atol=2e-3) if out_dtype else {}
    for a, b in zip(grads_of(compiled, inp), grads_of(block, inp)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("out_dtype,layout", [(None, "tiles"), (torch.float16, "rows")], ids=str)
def test_opcheck_registrations(out_dtype, layout):
    inp = make_inputs(2, 3, 8, torch.float32)
    x, gate, y, shift, scale, dh, dm = (inp[k] for k in ("x", "gate", "y", "shift", "scale", "dh", "dm"))
    ops = torch.ops.dit_fast
    torch.library.opcheck(ops.gated_residual.default, (x, gate, y))
    torch.library.opcheck(ops.gated_residual_backward.default, (dh, gate, y))
    torch.library.opcheck(ops.gated_residual_norm.default, (x, gate, y, shift, scale, 1e-6, out_dtype, layout))
    h, _, mean, rstd = gated_residual_norm_fwd(x, gate, y, shift, scale, 1e-6)
    dm = dm.to(out_dtype or dm.dtype)
    torch.library.opcheck(ops.gated_residual_norm_backward.default,
                          (dh, dm, h, gate, y, scale, mean, rstd, layout))
    torch.library.opcheck(ops.gated_residual_norm_backward.default,
                          (None, dm, h, gate, y, scale, mean, rstd, layout))


def test_reference_fallback_when_triton_cannot_run(monkeypatch):
    # both ops decide through gated_residual.kernels_run_on, which reads gated_residual's use_triton
    monkeypatch.setattr(gr_module, "use_triton", lambda device: False)
    inp = make_inputs(2, 5, 40, torch.float32)
    check_fused(inp)
    check_residual(inp)


def test_bad_inputs_raise_clear_errors():
    inp = make_inputs(2, 5, 40, torch.float32)
    x, gate, y = inp["x"], inp["gate"], inp["y"]
    with pytest.raises(ValueError, match="y must match"):
        gated_residual(x, gate, y[:, :3])
    with pytest.raises(ValueError, match="gate must have shape"):
        gated_residual(x, gate[:1], y)
    with pytest.raises(ValueError, match="scale must have shape"):
        gated_residual_norm(x, gate, y, inp["shift"], inp["scale"][:, :7])


# ----------------------------------------------------------------------------------- GPU only

# DiT-XL's shape in every dtype; an odd shape in bf16 only (each (dtype, width) pair is a fresh compile)
GPU_CASES = [(torch.bfloat16, (128, 256, 1152)), (torch.float16, (128, 256, 1152)),
             (torch.float32, (128, 256, 1152)), (torch.bfloat16, (3, 113, 1000))]


@needs_cuda
@pytest.mark.parametrize("dtype,shape", GPU_CASES, ids=str)
def test_gpu_matches_reference(dtype, shape):
    inp = make_inputs(*shape, dtype, device="cuda")
    for layout in LAYOUTS:
        check_fused(inp, layout=layout)
    check_residual(inp)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_out_dtype_equals_autocasts_own_cast(layout):
    inp = make_inputs(8, 256, 1152, torch.float32, device="cuda")
    got = autocast_block(inp, torch.bfloat16, layout, "cuda", torch.bfloat16)
    for a, b in zip(autocast_block(inp, None, layout, "cuda", torch.bfloat16), got):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(128, 256, 1152), (3, 113, 1000)], ids=str)
def test_gpu_out_dtype_bf16(shape, layout):
    """The autocast case: fp32 residual stream, bf16 y and adaLN vectors, m written in bf16."""
    inp = make_inputs(*shape, torch.float32, device="cuda", ada_dtype=torch.bfloat16)
    inp["y"] = inp["y"].bfloat16()
    check_fused(inp, layout=layout, out_dtype=torch.bfloat16)
    args = [inp[k] for k in ("x", "gate", "y", "shift", "scale")]
    _, m16, _, _ = gated_residual_norm_fwd(*args, 1e-6, torch.bfloat16, layout)
    _, m32, _, _ = gated_residual_norm_fwd(*args, 1e-6, None, layout)
    assert torch.equal(m16, m32.to(torch.bfloat16))


@needs_cuda
def test_gpu_backward_is_deterministic():
    inp = make_inputs(128, 256, 1152, torch.bfloat16, device="cuda")
    rows = functools.partial(gated_residual_norm, layout="rows")
    for fn in (gated_residual_norm, rows, gated_residual):
        names = ("x", "gate", "y") if fn is gated_residual else ("x", "gate", "y", "shift", "scale")
        first, second = grads_of(fn, inp, names), grads_of(fn, inp, names)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_torch_compile_inductor(layout):
    """Inductor sees the Triton kernels of both ops (triton_op) and matches eager; no graph break."""
    inp = make_inputs(8, 256, 1152, torch.float32, device="cuda", ada_dtype=torch.bfloat16)
    inp["y"] = inp["y"].bfloat16()

    def block(x, gate, y, shift, scale):
        h, m = gated_residual_norm(x, gate, y, shift, scale, out_dtype=torch.bfloat16, layout=layout)
        return gated_residual(h, gate, m.sin()), m

    for a, b in zip(grads_of(torch.compile(block, fullgraph=True), inp), grads_of(block, inp)):
        torch.testing.assert_close(a, b)
