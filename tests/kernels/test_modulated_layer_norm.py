"""Fused modulated LayerNorm vs the readable reference: forward, every gradient, determinism.

CPU: Triton's interpreter (fp32 and fp16; it cannot do bf16), tiny adversarial shapes. GPU: bf16/fp16/
fp32 at DiT-XL's (N, T, D) = (128, 256, 1152) and an odd shape. Error rule (flash-attention's):
err(kernel in dtype vs float64 gold) <= 2 * err(torch reference in dtype vs gold) + a small floor.
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of dit_fast_kernels / triton
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")  # only with DIT_FAST_ALLOW_NO_TRITON=1: conftest fails without it

from tests.kernels.rule import DEVICE, FLOOR, TINY_TILES, assert_rule  # noqa: E402,F401

from dit_fast_kernels.modulated_layer_norm import (  # noqa: E402
    modulated_layer_norm, modulated_layer_norm_bwd, modulated_layer_norm_fwd, modulated_layer_norm_ref,
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


def gold_and_base(x, shift, scale, dout):
    """float64 gold and the torch reference computed in the inputs' own dtype."""
    gold = grads_of(modulated_layer_norm_ref, *(t.double() for t in (x, shift, scale, dout)))
    base = grads_of(lambda *a: modulated_layer_norm_ref(*a, upcast=False), x, shift, scale, dout)
    return gold, base


def kernel_results(x, shift, scale, dout, tiles):
    """(out, dx, dshift, dscale): the public op via autograd, or the launchers with forced tiles."""
    if tiles is None:
        return grads_of(modulated_layer_norm, x, shift, scale, dout)
    out, mean, rstd = modulated_layer_norm_fwd(x, shift, scale, 1e-6, **tiles)
    return [out, *modulated_layer_norm_bwd(dout, x, scale, mean, rstd, **tiles)]


def check_all(x, shift, scale, dout, tiles=None):
    gold, base = gold_and_base(x, shift, scale, dout)
    got = kernel_results(x, shift, scale, dout, tiles)
    for name, o, g, b in zip(("out", "dx", "dshift", "dscale"), got, gold, base):
        assert o.dtype == b.dtype and o.shape == g.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        assert_rule(name, o, g, b, x.dtype)


# ----------------------------------------------------------------------------------- CPU + GPU

@pytest.mark.parametrize("tiles", [None, TINY_TILES], ids=["default-tiles", "tiny-tiles"])
@pytest.mark.parametrize("shape", [(2, 17, 40), (2, 25, 72)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_matches_reference(dtype, shape, tiles):
    check_all(*make_inputs(*shape, dtype), tiles=tiles)


@pytest.mark.parametrize("D", [1, 64, 1000], ids=str)
def test_widths_split_into_two_column_blocks(D):
    """Rows are held as a power-of-two block plus a masked one: D = 1, a power of two, 512 + 488."""
    check_all(*make_inputs(2, 3, D, torch.float32), tiles=dict(block_t=2, rows_per_program=2))


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


def test_backward_same_bits_twice_in_sequence():
    """Two launches give the same bits: no uninitialised or stale reads. The CPU interpreter runs the
    programs one after another, so it cannot see atomics races; test_gpu_backward_is_deterministic does."""
    x, shift, scale, dout = make_inputs(2, 25, 40, torch.float32)
    out, mean, rstd = modulated_layer_norm_fwd(x, shift, scale, 1e-6, **TINY_TILES)
    first = modulated_layer_norm_bwd(dout, x, scale, mean, rstd, **TINY_TILES)
    second = modulated_layer_norm_bwd(dout, x, scale, mean, rstd, **TINY_TILES)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_forward_and_backward():
    """No graph break: the op is one opaque node with fake and autograd registrations."""
    x, shift, scale, dout = make_inputs(2, 5, 40, torch.float32)

    def block(x, shift, scale):
        return modulated_layer_norm(x * 2, shift, scale).sin()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    want = grads_of(block, x, shift, scale, dout)
    got = grads_of(compiled, x, shift, scale, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_opcheck_registrations():
    x, shift, scale, dout = make_inputs(2, 3, 8, torch.float32)
    torch.library.opcheck(torch.ops.dit_fast.modulated_layer_norm.default, (x, shift, scale, 1e-6))
    _, mean, rstd = modulated_layer_norm_fwd(x, shift, scale, 1e-6)
    torch.library.opcheck(torch.ops.dit_fast.modulated_layer_norm_backward.default,
                          (dout, x, scale, mean, rstd))


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
@pytest.mark.parametrize("dtype,shape", GPU_CASES, ids=str)
def test_gpu_matches_reference(dtype, shape):
    check_all(*make_inputs(*shape, dtype, device="cuda"))


@needs_cuda
def test_gpu_backward_is_deterministic():
    x, shift, scale, dout = make_inputs(128, 256, 1152, torch.bfloat16, device="cuda")
    first = grads_of(modulated_layer_norm, x, shift, scale, dout)
    second = grads_of(modulated_layer_norm, x, shift, scale, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cuda
def test_gpu_torch_compile_inductor():
    x, shift, scale, dout = make_inputs(8, 256, 1152, torch.bfloat16, device="cuda")

    def block(x, shift, scale):
        return modulated_layer_norm(x * 2, shift, scale).sin()

    want = grads_of(block, x, shift, scale, dout)
    got = grads_of(torch.compile(block, fullgraph=True), x, shift, scale, dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
