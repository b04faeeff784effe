"""Model-level parity: DiT with every fast path on (Triton attention + fused adaLN kernels, activation
checkpointing) matches the reference path (math attention, torch ops), forward and every gradient.
On a CPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
import pytest
import torch

from dit_fast.models import DiT
from tests.conftest import requires_cuda


def build(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(input_size=(6, 10), patch_size=2, in_channels=4, hidden_size=144, depth=2, num_heads=2,
                num_classes=10)  # head dim 72 (DiT-XL's), 15 tokens (odd)
    args.update(kw)
    model = DiT(**args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def run(model, x, t, y):
    model.train()
    torch.manual_seed(7)                       # same label dropout for both models
    out = model(x, t, y)
    loss = (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum()
    loss.backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def inputs(device, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 6, 10, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (3,), generator=g).to(device)
    y = torch.randint(0, 10, (3,), generator=g).to(device)
    return x, t, y


def max_rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_every_fast_path_matches_reference_fp32_cpu():
    ref = build(attn_backend="math", fused_adaln=False)
    fast = build(attn_backend="triton", fused_adaln=True, grad_checkpointing=True)
    out_ref, grads_ref = run(ref, *inputs("cpu", torch.float32))
    out_fast, grads_fast = run(fast, *inputs("cpu", torch.float32))
    err = (out_fast - out_ref).abs().max().item()
    assert err <= 2e-5, f"forward differs by {err:.3e}"
    assert grads_ref.keys() == grads_fast.keys()
    for name, g_ref in grads_ref.items():
        rel = max_rel(grads_fast[name], g_ref)
        assert rel <= 1e-4, f"grad of {name} differs: relative error {rel:.3e}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_fast_path_matches_reference_gpu(dtype):
    """flash-attention's rule: the fast path in ``dtype`` may be at most 2x as far from the fp32 reference
    as the reference path computed in ``dtype`` is, plus a small floor."""
    torch.backends.cuda.matmul.allow_tf32 = False
    out32, grads32 = run(build(attn_backend="math").cuda(), *inputs("cuda", torch.float32))
    out_lo, grads_lo = run(build(attn_backend="math").to("cuda", dtype), *inputs("cuda", dtype))
    fast = build(attn_backend="triton", fused_adaln=True, grad_checkpointing=True).to("cuda", dtype)
    out_fast, grads_fast = run(fast, *inputs("cuda", dtype))
    floor = 1e-3
    assert max_rel(out_fast, out32) <= 2 * max_rel(out_lo, out32) + floor
    for name, g32 in grads32.items():
        bound = 2 * max_rel(grads_lo[name], g32) + floor
        rel = max_rel(grads_fast[name], g32)
        assert rel <= bound, f"grad of {name}: fast path rel. err {rel:.3e} > {bound:.3e}"


def test_fused_adaln_emits_the_autocast_dtype_bit_identical_to_the_cast(monkeypatch):
    """Under autocast the fused norms write the GEMM's input dtype themselves (out_dtype): the forward
    and every gradient equal, bit for bit, the same model whose norms return fp32 for autocast to cast;
    and both stay within half-precision error of the unfused torch ops. fp16 on the CPU: Triton's
    interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest even, as autocast does;
    tests/kernels/test_*::test_gpu_out_dtype_equals_autocasts_own_cast check bf16 there)."""
    dtype = torch.float16
    import dit_fast.layers as layers
    seen = []
    real = layers.gemm_input_dtype
    monkeypatch.setattr(layers, "gemm_input_dtype", lambda x: seen.append(real(x)) or seen[-1])

    def under_autocast(model):
        with torch.autocast("cpu", dtype=dtype):
            return run(model, *inputs("cpu", torch.float32))
    out_direct, grads_direct = under_autocast(build(attn_backend="math", fused_adaln=True))
    assert seen and all(d == dtype for d in seen), seen
    monkeypatch.setattr(layers, "gemm_input_dtype", lambda x: None)  # fp32 m, autocast casts it
    out_cast, grads_cast = under_autocast(build(attn_backend="math", fused_adaln=True))
    assert torch.equal(out_direct, out_cast)
    for name, g in grads_cast.items():
        assert torch.equal(grads_direct[name], g), name
    out_ref, grads_ref = under_autocast(build(attn_backend="math", fused_adaln=False))
    assert max_rel(out_direct, out_ref) <= 2e-2
    for name, g in grads_ref.items():
        assert max_rel(grads_direct[name], g) <= 5e-2, name


def count_matmuls_over(k, fn):
    """How many addmm/mm ops with inner dimension k run inside fn."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten, seen = torch.ops.aten, []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.addmm.default, aten.mm.default):
                a = args[1] if func is aten.addmm.default else args[0]
                seen.append(a.shape[-1] == k and a.shape[0] > 3)  # not the (N, K) adaLN / grad GEMMs
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return sum(seen)


@pytest.mark.parametrize("fused", [False, True])
def test_selective_checkpointing_equals_no_checkpointing_and_skips_fc2_recompute(fused):
    """--grad-checkpointing selective: forward and every gradient bit-identical to no checkpointing;
    the backward recomputes qkv/proj/fc1 (like full checkpointing) but not fc2."""
    x, t, y = inputs("cpu", torch.float32)
    out_ref, grads_ref = run(build(attn_backend="math", fused_adaln=fused), x, t, y)
    model = build(attn_backend="math", fused_adaln=fused, grad_checkpointing="selective")
    assert all(b.grad_checkpointing and b.checkpoint_policy == "selective" for b in model.blocks)
    out, grads = run(model, x, t, y)
    assert torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        assert torch.equal(grads[name], g), name
    k = model.blocks[0].mlp.fc2.in_features

    def fwd_bwd(m):
        def go():
            torch.manual_seed(7)
            m(x, t, y).square().mean().backward()
        return go
    depth = len(model.blocks)
    forward_only = count_matmuls_over(k, lambda: model(x, t, y))
    assert forward_only == depth                                          # one fc2 per block
    full = build(attn_backend="math", fused_adaln=fused, grad_checkpointing=True)
    # K = mlp width: fc2's forward GEMM and fc1's dgrad (fc2's dgrad contracts over D, wgrads over tokens)
    assert count_matmuls_over(k, fwd_bwd(full)) == 3 * depth             # forward, recompute, fc1 dgrad
    assert count_matmuls_over(k, fwd_bwd(model)) == 2 * depth            # no recompute: fc2's output kept
