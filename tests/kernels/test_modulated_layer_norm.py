"""Fused modulated LayerNorm vs the readable reference: forward, every gradient, determinism.

CPU: Triton's interpreter (fp32 and fp16; it cannot do bf16), tiny adversarial shapes. GPU: bf16/fp16/
fp32 at DiT-XL's (N, T, D) = (128, 256, 1152) and an odd shape. Error rule (flash-attention's):
err(kernel in dtype vs float64 gold) <= 2 * err(torch reference in dtype vs gold) + a small floor.
Both kernel layouts ("tiles", "rows") and the out_dtype switch (m written in the GEMM dtype) are checked.
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

from dit_fast_kernels.modulated_layer_norm import (  # noqa: E402
    LAYOUTS, modulated_layer_norm, modulated_layer_norm_bwd, modulated_layer_norm_fwd, modulated_layer_norm_ref,
)

# the package re-exports the function under the module's name: fetch the module itself
mln_module = importlib.import_module("dit_fast_kernels.modulated_layer_norm")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(N, T, D, dtype, device=DEVICE, mean=0.0, seed=0):
    """x (N, T, D); shift/scale as non-contiguous chunks of an (N, 6D) adaLN output; dout (N, T, D)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (mean + 2 * torch.randn(N, T, D, generator=g, device=device)).to(device, dtype)
    ada = (0.5 * torch.randn(N, 6 * D, generator=g, device=device)).to(device, dtype)
    dout = torch.randn(N, T, D, generator=g, device=device).to(device, dtype)
    return x, ada[:, :D], ada[:, 2 * D:3 * D], dout


def grads_of(fn, x, shift, scale, dout):
    """(out, dx, dshift, dscale) of fn through autograd, on leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale)]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def gold_and_base(x, shift, scale, dout, out_dtype=None):
    """float64 gold and the torch reference computed in the inputs' own dtype (its m then cast to
    out_dtype, as autocast would). dout is in out_dtype, as autograd hands it to the kernel."""
    gold = grads_of(modulated_layer_norm_ref, *(t.double() for t in (x, shift, scale, dout)))
    base = grads_of(lambda *a: modulated_layer_norm_ref(*a, upcast=False).to(out_dtype or x.dtype),
                    x, shift, scale, dout)
    return gold, base


def kernel_results(x, shift, scale, dout, tiles, layout=None, out_dtype=None):
    """(out, dx, dshift, dscale): the public op via autograd, or the launchers with forced tiles."""
    if tiles is None:
        return grads_of(lambda *a: modulated_layer_norm(*a, out_dtype=out_dtype, layout=layout),
                        x, shift, scale, dout)
    out, mean, rstd = modulated_layer_norm_fwd(x, shift, scale, 1e-6, out_dtype, layout, **tiles)
    return [out, *modulated_layer_norm_bwd(dout, x, scale, mean, rstd, layout, **tiles)]


def check_all(x, shift, scale, dout, tiles=None, layout=None, out_dtype=None):
    """Forward and every gradient under the rule; out in out_dtype, the gradients in the inputs' dtypes."""
    dout = dout.to(out_dtype or x.dtype)
    gold, base = gold_and_base(x, shift, scale, dout, out_dtype)
    got = kernel_results(x, shift, scale, dout, tiles, layout, out_dtype)
    for name, o, g, b in zip(("out", "dx", "dshift", "dscale"), got, gold, base):
        assert o.dtype == b.dtype and o.shape == g.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        assert_rule(name, o, g, b, x.dtype)


# ----------------------------------------------------------------------------------- CPU + GPU

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiles", [None, TINY_TILES], ids=["default-tiles", "tiny-tiles"])
@pytest.mark.parametrize("shape", [(2, 17, 40), (2, 25, 72)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_reference(dtype, shape, tiles, layout):
    check_all(*make_inputs(*shape, dtype), tiles=tiles, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("D", [1, 64, 1000], ids=str)
def test_widths_split_into_two_column_blocks(D, layout):
    """Rows are held as a power-of-two block plus a masked one: D = 1, a power of two, 512 + 488."""
    check_all(*make_inputs(2, 3, D, torch.float32), tiles=dict(block_t=2, rows_per_program=2), layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dit_width_with_fp16_m(layout):
    """D = 1152 (1024 + 128 column blocks, the rows layout's one row per tile), odd T, default launch."""
    check_all(*make_inputs(2, 5, 1152, torch.float32), layout=layout, out_dtype=torch.float16)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tiles", [None, dict(block_t=2, rows_per_program=5)], ids=["default-tiles", "odd-chunks"])
def test_out_dtype_writes_the_gemm_input(tiles, layout):
    """fp32 x, m in fp16 (the autocast case): the same bits as the kernel's fp32 m cast by torch (what
    autocast's separate cast kernel produced), within the rule of the reference; the fp16 dm comes
    back as fp32 dx/dshift/dscale."""
    x, shift, scale, dout = make_inputs(3, 13, 96, torch.float32)
    check_all(x, shift, scale, dout, tiles=tiles, layout=layout, out_dtype=torch.float16)
    opts = tiles or {}
    out16, mean, rstd = modulated_layer_norm_fwd(x, shift, scale, 1e-6, torch.float16, layout, **opts)
    out32, mean32, rstd32 = modulated_layer_norm_fwd(x, shift, scale, 1e-6, None, layout, **opts)
    assert out16.dtype == torch.float16 and torch.equal(out16, out32.to(torch.float16))
    assert torch.equal(mean, mean32) and torch.equal(rstd, rstd32)
    # the fp16 gradient is upcast in the kernel: identical to handing it over as fp32
    d16 = dout.half()
    for a, b in zip(modulated_layer_norm_bwd(d16, x, scale, mean, rstd, layout, **opts),
                    modulated_layer_norm_bwd(d16.float(), x, scale, mean, rstd, layout, **opts)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def autocast_block(x, shift, scale, out_dtype, layout, device_type="cpu", dtype=torch.float16):
    """The next GEMM's output and every gradient (weights too) of the op feeding a linear under autocast."""
    w = torch.randn(24, x.shape[-1], generator=torch.Generator().manual_seed(1)).to(x.device)
    gout = torch.randn(*x.shape[:2], 24, generator=torch.Generator().manual_seed(2)).to(x.device)
    leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale, w)]
    with torch.autocast(device_type, dtype=dtype):
        m = modulated_layer_norm(*leaves[:3], out_dtype=out_dtype, layout=layout)
        out = torch.nn.functional.linear(m, leaves[3])
    out.float().backward(gout)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_dtype_equals_autocasts_own_cast(layout):
    """Under autocast, the next GEMM gives the same bits, forward and every gradient, whether it gets
    fp32 m and casts it (today) or m written in fp16 by the kernel (the switch)."""
    x, shift, scale, _ = make_inputs(2, 7, 40, torch.float32)
    for a, b in zip(autocast_block(x, shift, scale, None, layout),
                    autocast_block(x, shift, scale, torch.float16, layout)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_out_dtype_of_the_public_function():
    x, shift, scale, _ = make_inputs(2, 5, 40, torch.float32)
    assert modulated_layer_norm(x, shift, scale).dtype == torch.float32
    assert modulated_layer_norm(x, shift, scale, out_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(TypeError, match="out_dtype"):
        modulated_layer_norm(x, shift, scale, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="layout"):
        modulated_layer_norm(x, shift, scale, layout="columns")


def test_layouts_agree():
    """Same numbers from both tilings (up to fp32 summation order in the reductions)."""
    x, shift, scale, dout = make_inputs(2, 25, 72, torch.float32)
    tiles = kernel_results(x, shift, scale, dout, None, "tiles")
    rows = kernel_results(x, shift, scale, dout, None, "rows")
    for a, b in zip(tiles, rows):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_eager_calls_run_the_kernels(monkeypatch):
    """The triton_op's eager path launches the Triton kernels (here: interpreted), not the reference."""
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernels")

    monkeypatch.setattr(mln_module, "_forward_ref", no_reference)
    monkeypatch.setattr(mln_module, "_backward_ref", no_reference)
    x, shift, scale, dout = make_inputs(2, 5, 40, torch.float32)
    grads_of(modulated_layer_norm, x, shift, scale, dout)


def test_rows_with_large_mean():
    """x = 1000 + noise: a one-pass E[x^2] - E[x]^2 variance would be off by percents."""
    x, shift, scale, dout = make_inputs(3, 5, 72, torch.float32, mean=1000.0)
    check_all(x, shift, scale, dout, tiles=TINY_TILES)
    out = modulated_layer_norm(x, shift, scale)
    gold = modulated_layer_norm_ref(x.double(), shift.double(), scale.double())
    assert (out.double() - gold).abs().max().item() < 1e-3


def test_strided_inputs_and_chunks_spanning_samples():
    """x a slice along T (sample stride != T*D); 3 samples whose T=5 is not a multiple of the tile."""
    base, shift, scale, dout = make_inputs(3, 7, 40, torch.float32)
    x = base[:, 1:6]
    assert not x.is_contiguous()
    check_all(x, shift, scale, dout[:, :5].contiguous(), tiles=dict(block_t=2, rows_per_program=4))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_same_bits_twice_in_sequence(layout):
    """Two launches give the same bits: no uninitialised or stale reads. The CPU interpreter runs the
    programs one after another, so it cannot see atomics races; test_gpu_backward_is_deterministic does."""
    x, shift, scale, dout = make_inputs(2, 25, 40, torch.float32)
    out, mean, rstd = modulated_layer_norm_fwd(x, shift, scale, 1e-6, None, layout, **TINY_TILES)
    first = modulated_layer_norm_bwd(dout, x, scale, mean, rstd, layout, **TINY_TILES)
    second = modulated_layer_norm_bwd(dout, x, scale, mean, rstd, layout, **TINY_TILES)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("out_dtype", [None, torch.float16], ids=str)
def test_torch_compile_fullgraph_forward_and_backward(out_dtype):
    """No graph break: fake and autograd registrations; the fake gives m in out_dtype. (Traced on
    the CPU the triton_op body becomes the reference's torch ops: the interpreter can't run on fake
    tensors. On CUDA the graph holds the kernels, test_gpu_torch_compile_inductor.)"""
    x, shift, scale, dout = make_inputs(2, 5, 40, torch.float32)

    def block(x, shift, scale):
        return modulated_layer_norm(x * 2, shift, scale, out_dtype=out_dtype, layout="rows").float().sin()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    want = grads_of(block, x, shift, scale, dout)
    got = grads_of(compiled, x, shift, scale, dout)
    tol = dict(rtol=2e-3, atol=2e-3) if out_dtype else {}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("out_dtype,layout", [(None, "tiles"), (torch.float16, "rows")], ids=str)
def test_opcheck_registrations(out_dtype, layout):
    x, shift, scale, dout = make_inputs(2, 3, 8, torch.float32)
    torch.library.opcheck(torch.ops.dit_fast.modulated_layer_norm.default,
                          (x, shift, scale, 1e-6, out_dtype, layout))
    _, mean, rstd = modulated_layer_norm_fwd(x, shift, scale, 1e-6)
    torch.library.opcheck(torch.ops.dit_fast.modulated_layer_norm_backward.default,
                          (dout.to(out_dtype or x.dtype), x, scale, mean, rstd, layout))


def test_reference_fallback_when_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(mln_module, "use_triton", lambda device: False)
    check_all(*make_inputs(2, 5, 40, torch.float32))


def test_bad_inputs_raise_clear_errors():
    x, shift, scale, _ = make_inputs(2, 5, 40, torch.float32)
    with pytest.raises(ValueError, match="shift must have shape"):
        modulated_layer_norm(x, shift[:, :8], scale)
    with pytest.raises(ValueError, match=r"x must have shape \(N, T, D\)"):
        modulated_layer_norm(x[0], shift, scale)
    with pytest.raises(TypeError, match="floating-point"):
        modulated_layer_norm(x, shift, scale.long())


# ----------------------------------------------------------------------------------- GPU only

# DiT-XL's shape in every dtype; odd shapes in bf16 only (each (dtype, width) pair is a fresh compile)
GPU_CASES = [(torch.bfloat16, (128, 256, 1152)), (torch.float16, (128, 256, 1152)),
             (torch.float32, (128, 256, 1152)), (torch.bfloat16, (3, 113, 1000)), (torch.bfloat16, (4, 1024, 72))]


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,shape", GPU_CASES, ids=str)
def test_gpu_matches_reference(dtype, shape, layout):
    check_all(*make_inputs(*shape, dtype, device="cuda"), layout=layout)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_out_dtype_equals_autocasts_own_cast(layout):
    x, shift, scale, _ = make_inputs(8, 256, 1152, torch.float32, device="cuda")
    got = autocast_block(x, shift, scale, torch.bfloat16, layout, "cuda", torch.bfloat16)
    for a, b in zip(autocast_block(x, shift, scale, None, layout, "cuda", torch.bfloat16), got):
        assert a.dtype == b.dtype and torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(128, 256, 1152), (3, 113, 1000)], ids=str)
def test_gpu_out_dtype_bf16(shape, layout):
    """The autocast case: fp32 x, m written in bf16 (bits of the fp32 m cast), bf16 dm."""
    x, shift, scale, dout = make_inputs(*shape, torch.float32, device="cuda")
    check_all(x, shift, scale, dout, layout=layout, out_dtype=torch.bfloat16)
    out16, _, _ = modulated_layer_norm_fwd(x, shift, scale, 1e-6, torch.bfloat16, layout)
    out32, _, _ = modulated_layer_norm_fwd(x, shift, scale, 1e-6, None, layout)
    assert torch.equal(out16, out32.to(torch.bfloat16))


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_backward_is_deterministic(layout):
    x, shift, scale, dout = make_inputs(128, 256, 1152, torch.bfloat16, device="cuda")
    fn = functools.partial(modulated_layer_norm, layout=layout)
    first = grads_of(fn, x, shift, scale, dout)
    second = grads_of(fn, x, shift, scale, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_torch_compile_inductor(layout):
    """Inductor sees the Triton kernels (triton_op) and matches eager; no graph break."""
    x, shift, scale, dout = make_inputs(8, 256, 1152, torch.bfloat16, device="cuda")

    def block(x, shift, scale):
        return modulated_layer_norm(x.float() * 2, shift, scale, out_dtype=torch.bfloat16, layout=layout).sin()

    want = grads_of(block, x, shift, scale, dout)
    got = grads_of(torch.compile(block, fullgraph=True), x, shift, scale, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
