"""The REPA tap, DiT.forward(..., return_hidden_at=k): the tokens after the first k blocks, the same
through every fast path (attention backends, fused adaLN, full / fractional / selective activation
checkpointing, per-block compile), forward and gradients, and equal to running those blocks by hand;
the output and the state-dict keys are those of the untapped model."""
import pytest
import torch

from tests.conftest import requires_cuda
from tests.test_fast_paths import build, inputs, max_rel

DEPTH, TAP = 3, 2


def tapped(model, x, t, y):
    """(out, hidden, grads) of a loss reading both the output and the tapped tokens, in train mode
    with the same label dropout every time."""
    model.train()
    torch.manual_seed(7)
    out, hidden = model(x, t, y, return_hidden_at=TAP)
    w_out = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    w_hid = torch.linspace(1, -2, hidden.numel(), device=out.device).view_as(hidden)
    ((out.float() * w_out).sum() + (hidden.float() * w_hid).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), hidden.detach(), grads


def test_hidden_is_the_first_blocks_run_by_hand_and_output_is_unchanged():
    model = build(depth=DEPTH).eval()
    x, t, y = inputs("cpu", torch.float32)
    out, hidden = model(x, t, y, return_hidden_at=TAP)
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks[:TAP]:
        tokens = block(tokens, c)
    assert hidden.shape == (3, 15, 144)
    assert torch.equal(hidden, tokens)
    assert torch.equal(out, model(x, t, y))
    assert not torch.equal(hidden, model(x, t, y, return_hidden_at=TAP + 1)[1])
    with pytest.raises(ValueError):
        model(x, t, y, return_hidden_at=DEPTH + 1)


@pytest.mark.parametrize("checkpointing", [True, 0.5, "selective"])
def test_checkpointing_modes_give_the_same_bits(checkpointing):
    args = inputs("cpu", torch.float32)
    ref = tapped(build(depth=DEPTH, attn_backend="math"), *args)
    got = tapped(build(depth=DEPTH, attn_backend="math", grad_checkpointing=checkpointing), *args)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[2].keys() == ref[2].keys()
    for name, g in ref[2].items():
        assert torch.equal(got[2][name], g), name


def assert_close_paths(got, ref, tol_fwd=2e-5, tol_grad=1e-4):
    for label, a, b in (("output", got[0], ref[0]), ("hidden", got[1], ref[1])):
        err = (a - b).abs().max().item()
        assert err <= tol_fwd, f"{label} differs by {err:.3e}"
    assert got[2].keys() == ref[2].keys()
    for name, g in ref[2].items():
        rel = max_rel(got[2][name], g)
        assert rel <= tol_grad, f"grad of {name}: relative error {rel:.3e}"


@pytest.mark.parametrize("fast", [
    dict(attn_backend="sdpa"),
    dict(attn_backend="triton"),
    dict(attn_backend="math", fused_adaln=True),
    dict(attn_backend="triton", fused_adaln=True, grad_checkpointing="selective"),
    dict(attn_backend="triton", fused_adaln=True, grad_checkpointing=0.5),
])
def test_every_fast_path_taps_the_reference_hidden_state(fast):
    args = inputs("cpu", torch.float32)
    ref = tapped(build(depth=DEPTH, attn_backend="math"), *args)
    assert_close_paths(tapped(build(depth=DEPTH, **fast), *args), ref)


def test_per_block_compile_taps_the_same_hidden_state():
    """Blocks compiled in place as train.py does (apply_compile); aot_eager traces forward and
    backward through dynamo and AOTAutograd without a C++ toolchain."""
    args = inputs("cpu", torch.float32)
    ref = tapped(build(depth=DEPTH, attn_backend="math", grad_checkpointing="selective"), *args)
    model = build(depth=DEPTH, attn_backend="math", grad_checkpointing="selective")
    keys = list(model.state_dict())
    for block in model.blocks:
        block.compile(backend="aot_eager")
    assert list(model.state_dict()) == keys
    assert_close_paths(tapped(model, *args), ref)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_path_tap_on_gpu_within_half_precision_error(dtype):
    """flash-attention's rule, as test_fast_paths: the fast path in ``dtype`` at most 2x as far from
    the fp32 reference as the reference path in ``dtype``, plus a small floor."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref32 = tapped(build(depth=DEPTH, attn_backend="math").cuda(), *inputs("cuda", torch.float32))
    ref_lo = tapped(build(depth=DEPTH, attn_backend="math").to("cuda", dtype), *inputs("cuda", dtype))
    fast = build(depth=DEPTH, attn_backend="triton", fused_adaln=True, grad_checkpointing="selective")
    got = tapped(fast.to("cuda", dtype), *inputs("cuda", dtype))
    for i in (0, 1):
        assert max_rel(got[i], ref32[i]) <= 2 * max_rel(ref_lo[i], ref32[i]) + 1e-3
    for name, g32 in ref32[2].items():
        assert max_rel(got[2][name], g32) <= 2 * max_rel(ref_lo[2][name], g32) + 1e-3, name
