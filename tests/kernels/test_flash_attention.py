"""Flash attention kernels vs the fp32 reference (flash-attention's rule), CPU interpreter + GPU tier.

Rule: err(kernel in dtype vs fp32 reference) <= 2 * err(plain torch in dtype vs fp32 reference) + floor.
The fp32 reference runs on the low-precision inputs upcast, so only the arithmetic is compared.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from dit_fast_kernels.flash_attention import attention_ref, flash_attention  # noqa: E402

# the module itself (the package's `flash_attention` attribute is the function of the same name)
fa = importlib.import_module("dit_fast_kernels.flash_attention")

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def attention_in_dtype(q, k, v, scale):
    """Plain torch attention without upcasting: PyTorch's own error in the low-precision dtype."""
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores.float(), dim=-1).to(q.dtype)


def packed_qkv(B, H, T, d, dtype, device="cpu", seed=0):
    """Leaf (B, T, 3 * H * d) tensor and the strided q, k, v views DiT's fused projection makes."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    q, k, v = qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)  # each (B, H, T, d), strided
    return qkv, q, k, v


def assert_rule(name, got, ref, base, floor):
    """Fail with where and how much when got misses the rule against base."""
    err = (got.float() - ref.float()).abs()
    base_err = (base.float() - ref.float()).abs().max().item()
    tol = 2 * base_err + floor
    worst = err.max().item()
    if not worst <= tol:  # also catches NaN
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(torch.nan_to_num(err, nan=1e30)), err.shape))
        raise AssertionError(f"{name}: max err {worst:.3e} at {idx} (got {got.float()[idx].item():.6f}, "
                             f"ref {ref.float()[idx].item():.6f}) > tol {tol:.3e} = 2 * {base_err:.3e} + {floor}")


def check_against_reference(B, H, T, d, dtype, device="cpu", scale=None):
    """Forward, lse, dq, dk, dv of the kernels vs the fp32 reference, all through packed qkv views."""
    scale = d ** -0.5 if scale is None else scale
    qkv, q, k, v = packed_qkv(B, H, T, d, dtype, device)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(B, H, T, d, generator=gen).to(device=device, dtype=dtype)

    out, lse = fa.flash_attention_fwd(q, k, v, scale)
    assert out.dtype == dtype and out.shape == (B, H, T, d) and lse.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous(), f"output must be (B, T, H, d)-contiguous, strides {out.stride()}"
    *grads, dqkv_got = torch.autograd.grad(out, (q, k, v, qkv), dout)
    dq, dk, dv = (g.float() for g in grads)

    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*ref_leaves, scale, return_lse=True)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.float())
    low_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low_out, low_lse = attention_in_dtype(*low_leaves, scale)
    low_grads = torch.autograd.grad(low_out, low_leaves, dout)

    floor = FLOOR[dtype]
    tag = f"(B,H,T,d)=({B},{H},{T},{d}) {dtype}"
    assert_rule(f"out {tag}", out, ref_out, low_out, floor)
    assert_rule(f"lse {tag}", lse, ref_lse, low_lse, floor)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, low_grads):
        assert_rule(f"{name} {tag}", got, ref, low, floor)
    assert torch.isfinite(dqkv_got).all()


# ----------------------------------------------------------------------------- CPU tier (interpreter)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,T,d", [(1, 2, 17, 72), (2, 2, 25, 64), (1, 2, 25, 40)])
def test_matches_reference(B, H, T, d, dtype):
    check_against_reference(B, H, T, d, dtype)


def test_matches_reference_many_blocks():
    """T = 113: seven full 16-row tiles and a one-row tail in both loops (the interpreter's tiles)."""
    check_against_reference(1, 2, 113, 72, torch.float32)


@pytest.mark.parametrize("d", [36, 9])  # row strides divisible by 4 only / not at all (ALIGN 4 / 1)
def test_contiguous_inputs_odd_head_dims_and_custom_scale(d):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 19, d, generator=gen).requires_grad_() for _ in range(3))
    out = flash_attention(q, k, v, softmax_scale=0.3)
    ref = attention_ref(q, k, v, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_backward_same_bits_twice_in_sequence():
    """Two backward passes give the same bits (no uninitialised or stale reads). On the CPU the
    interpreter runs programs one after another, so a race between programs can't show here."""
    qkv, q, k, v = packed_qkv(1, 2, 25, 72, torch.float16)
    dout = torch.randn(1, 2, 25, 72).half()
    first = torch.autograd.grad(flash_attention(q, k, v), qkv, dout)[0]
    second = torch.autograd.grad(flash_attention(q, k, v), qkv, dout)[0]
    assert torch.equal(first, second)


def test_reference_fallback_matches_kernels(monkeypatch):
    """Without a usable Triton the op runs the reference, with the same layout and values."""
    qkv, q, k, v = packed_qkv(1, 2, 17, 72, torch.float32)
    dout = torch.randn(1, 2, 17, 72)
    out = flash_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    monkeypatch.setattr(fa, "triton_status", lambda device: (False, "disabled by the test"))
    out_ref = flash_attention(q, k, v)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), dout)
    assert out_ref.stride() == out.stride()
    torch.testing.assert_close(out_ref, out, atol=1e-5, rtol=1e-5)
    for g_ref, g in zip(grads_ref, grads):
        assert g_ref.stride() == g.stride()
        torch.testing.assert_close(g_ref, g, atol=1e-5, rtol=1e-5)


def test_custom_ops_pass_opcheck():
    qkv, q, k, v = packed_qkv(1, 1, 17, 40, torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.dit_fast.flash_attention_fwd.default, (q, k, v, 0.25))
    out, lse = fa.flash_attention_fwd(q, k, v, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 0.25)
    torch.library.opcheck(torch.ops.dit_fast.flash_attention_bwd.default, args)


def test_compiles_without_graph_break():
    """A DiT-style attention (fused qkv -> flash attention -> proj) under torch.compile(fullgraph=True)."""
    B, T, H, d = 1, 17, 2, 72
    qkv_proj = torch.nn.Linear(H * d, 3 * H * d)
    proj = torch.nn.Linear(H * d, H * d)

    def attn(x):
        q, k, v = qkv_proj(x).reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
        return proj(flash_attention(q, k, v).transpose(1, 2).reshape(B, T, H * d))

    x = torch.randn(B, T, H * d, requires_grad=True)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    grad_c = torch.autograd.grad(out_c.square().sum(), x)[0]
    out_e = attn(x)
    grad_e = torch.autograd.grad(out_e.square().sum(), x)[0]
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(grad_c, grad_e)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="one shape"):
        flash_attention(q, q[..., :8], q)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(*(torch.randn(1, 1, 4, 320),) * 3)


# ----------------------------------------------------------------------------- GPU tier
def check_against_sdpa_math(B, H, T, d, dtype):
    """Like check_against_reference, with the fp32 reference from SDPA's math backend (less memory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv, q, k, v = packed_qkv(B, H, T, d, dtype, "cuda")
    dout = torch.randn(B, H, T, d, device="cuda", dtype=dtype)
    out = flash_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref_out = torch.nn.functional.scaled_dot_product_attention(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.float())
    low_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low_out = attention_in_dtype(*low_leaves, d ** -0.5)[0]
    low_grads = torch.autograd.grad(low_out, low_leaves, dout)
    tag = f"(B,H,T,d)=({B},{H},{T},{d}) {dtype}"
    assert_rule(f"out {tag}", out, ref_out, low_out, FLOOR[dtype])
    for name, got, ref, low in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert_rule(f"{name} {tag}", got, ref, low, FLOOR[dtype])


# Each distinct (dtype, d, masked tail) compiles every autotune config once: the GPU list stays short.
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,T,d", [(128, 16, 256, 72), (32, 16, 1024, 72)])
def test_gpu_matches_sdpa_math_dit_xl(B, H, T, d, dtype):
    check_against_sdpa_math(B, H, T, d, dtype)
    torch.cuda.empty_cache()


@cuda
@pytest.mark.parametrize("B,H,T,d", [(8, 16, 512, 64), (8, 16, 256, 128)])
def test_gpu_matches_sdpa_math_power_of_two_head_dims(B, H, T, d):
    check_against_sdpa_math(B, H, T, d, torch.bfloat16)


@cuda
def test_gpu_masked_tail_and_lse():
    """Odd T on the GPU's autotuned tiles, with the lse checked too (fp32 math is covered on CPU)."""
    check_against_reference(4, 16, 113, 72, torch.bfloat16, device="cuda")
