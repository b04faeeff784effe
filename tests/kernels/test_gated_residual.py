"""Gated residual x + gate * y, and its fusion with the next modulated LayerNorm, vs the reference.

CPU: Triton's interpreter (fp32, fp16), tiny adversarial shapes. GPU: bf16/fp16/fp32 at DiT-XL's
(128, 256, 1152) and an odd shape. Error rule (flash-attention's): err(kernel in dtype vs float64
gold) <= 2 * err(torch reference in dtype vs gold) + a small floor. Every gradient is checked.
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of dit_fast_kernels / triton
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")  # only with DIT_FAST_ALLOW_NO_TRITON=1: conftest fails without it

from tests.kernels.rule import DEVICE, FLOOR, TINY_TILES, assert_rule  # noqa: E402,F401

from dit_fast_kernels.gated_residual import (  # noqa: E402
    gated_residual, gated_residual_bwd, gated_residual_fwd, gated_residual_norm, gated_residual_norm_bwd,
    gated_residual_norm_fwd, gated_residual_norm_ref, gated_residual_ref,
)
from dit_fast_kernels.modulated_layer_norm import modulated_layer_norm  # noqa: E402

# the package re-exports the function under the module's name: fetch the module itself
gr_module = importlib.import_module("dit_fast_kernels.gated_residual")
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


def fused_ref(upcast=True):
    return lambda x, gate, y, shift, scale: gated_residual_norm_ref(x, gate, y, shift, scale, 1e-6, upcast)


def residual_ref(upcast=True):
    return lambda x, gate, y: gated_residual_ref(x, gate, y, upcast)


def check(fn, ref, inp, names, labels, dtype):
    gold = grads_of(ref(True), {k: v.double() for k, v in inp.items()}, names)
    base = grads_of(ref(False), inp, names)
    for label, o, g, b in zip(labels, grads_of(fn, inp, names) if callable(fn) else fn, gold, base):
        assert o.dtype == b.dtype and o.shape == g.shape, f"{label}: {o.dtype} {tuple(o.shape)}"
        assert_rule(label, o, g, b, dtype)


def launch_fused(inp, tiles):
    """(h, m, dx, dgate, dy, dshift, dscale) from the launchers, with forced tiles."""
    h, m, mean, rstd = gated_residual_norm_fwd(*(inp[k] for k in ("x", "gate", "y", "shift", "scale")), 1e-6,
                                               **tiles)
    dx, dy, dgate, dshift, dscale = gated_residual_norm_bwd(inp["dh"], inp["dm"], h, inp["gate"], inp["y"],
                                                            inp["scale"], mean, rstd, **tiles)
    return [h, m, dx, dgate, dy, dshift, dscale]


def check_fused(inp, tiles=None):
    fn = gated_residual_norm if tiles is None else launch_fused(inp, tiles)
    check(fn, fused_ref, inp, ("x", "gate", "y", "shift", "scale"), NAMES, inp["x"].dtype)


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


@pytest.mark.parametrize("tiles", [None, TINY_TILES], ids=["default-tiles", "tiny-tiles"])
@pytest.mark.parametrize("shape", [(2, 17, 40), (2, 25, 72)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gated_residual_norm_matches_reference(dtype, shape, tiles):
    check_fused(make_inputs(*shape, dtype), tiles)


@pytest.mark.parametrize("D", [1, 64, 1000], ids=str)
def test_widths_split_into_two_column_blocks(D):
    """Rows are held as a power-of-two block plus a masked one: D = 1, a power of two, 512 + 488."""
    inp = make_inputs(2, 3, D, torch.float32)
    check_fused(inp, dict(block_t=2, rows_per_program=2))
    check_residual(inp, dict(block_t=2, rows_per_program=2))


def test_gated_residual_norm_when_only_m_is_used():
    """Gradients flow into m only (h unused downstream): the kernel's no-dh path."""
    inp = make_inputs(3, 5, 40, torch.float32)
    inp["dh"] = torch.zeros_like(inp["dh"])
    h, m, mean, rstd = gated_residual_norm_fwd(*(inp[k] for k in ("x", "gate", "y", "shift", "scale")), 1e-6)
    got_none = gated_residual_norm_bwd(None, inp["dm"], h, inp["gate"], inp["y"], inp["scale"], mean, rstd,
                                       block_t=2, rows_per_program=4)
    got_zero = gated_residual_norm_bwd(inp["dh"], inp["dm"], h, inp["gate"], inp["y"], inp["scale"], mean,
                                       rstd, block_t=2, rows_per_program=4)
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
    assert all(torch.equal(a, b) for a, b in zip(launch_fused(inp, TINY_TILES), launch_fused(inp, TINY_TILES)))
    first = gated_residual_bwd(inp["dh"], inp["gate"], inp["y"], **TINY_TILES)
    second = gated_residual_bwd(inp["dh"], inp["gate"], inp["y"], **TINY_TILES)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_torch_compile_fullgraph_forward_and_backward():
    """No graph break through either op, forward and backward."""
    inp = make_inputs(2, 5, 40, torch.float32)

    def block(x, gate, y, shift, scale):
        h, m = gated_residual_norm(x, gate, y, shift, scale)
        return gated_residual(h, gate, m.tanh()), m

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for a, b in zip(grads_of(compiled, inp), grads_of(block, inp)):
        torch.testing.assert_close(a, b)


def test_opcheck_registrations():
    inp = make_inputs(2, 3, 8, torch.float32)
    x, gate, y, shift, scale, dh, dm = (inp[k] for k in ("x", "gate", "y", "shift", "scale", "dh", "dm"))
    ops = torch.ops.dit_fast
    torch.library.opcheck(ops.gated_residual.default, (x, gate, y))
    torch.library.opcheck(ops.gated_residual_backward.default, (dh, gate, y))
    torch.library.opcheck(ops.gated_residual_norm.default, (x, gate, y, shift, scale, 1e-6))
    h, _, mean, rstd = gated_residual_norm_fwd(x, gate, y, shift, scale, 1e-6)
    torch.library.opcheck(ops.gated_residual_norm_backward.default, (dh, dm, h, gate, y, scale, mean, rstd))


def test_reference_fallback_when_triton_cannot_run(monkeypatch):
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
    check_fused(inp)
    check_residual(inp)


@needs_cuda
def test_gpu_backward_is_deterministic():
    inp = make_inputs(128, 256, 1152, torch.bfloat16, device="cuda")
    for fn in (gated_residual_norm, gated_residual):
        names = ("x", "gate", "y", "shift", "scale") if fn is gated_residual_norm else ("x", "gate", "y")
        first, second = grads_of(fn, inp, names), grads_of(fn, inp, names)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
