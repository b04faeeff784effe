"""DiT model: sizes, the original key layout, backends and speed switches that keep the numbers."""
import importlib

import pytest
import torch

from dit_fast.config import ModelConfig
from dit_fast.models import DiT, DiT_models, build_model


def expected_params(depth, D, p, in_ch=4, input_size=32, num_classes=1000, learn_sigma=True):
    """Parameter count of the original architecture, written out layer by layer."""
    out = in_ch * 2 if learn_sigma else in_ch
    T = (input_size // p) ** 2
    embed = in_ch * p * p * D + D + (256 * D + D + D * D + D) + (num_classes + 1) * D + T * D
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    final = (2 * D * D + 2 * D) + (D * p * p * out + p * p * out)
    return embed + depth * block + final


SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


@pytest.mark.parametrize("name", list(DiT_models))
def test_parameter_counts(name):
    size, p = name[4:].split("/")
    depth, D, heads = SIZES[size]
    with torch.device("meta"):
        model = DiT_models[name]()
    assert sum(t.numel() for t in model.parameters()) == expected_params(depth, D, int(p))
    assert model.blocks[0].attn.num_heads == heads and len(model.blocks) == depth


def test_dit_xl2_has_the_published_parameter_count():
    with torch.device("meta"):
        assert sum(p.numel() for p in DiT_models["DiT-XL/2"]().parameters()) == 675_129_632


def original_keys(depth):
    """The key layout of the official checkpoints (timm PatchEmbed / Attention / Mlp names)."""
    keys = ["pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
            "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight"]
    for i in range(depth):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += [f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"]
    keys += ["final_layer.linear.weight", "final_layer.linear.bias",
             "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    return keys


def small(**kw):
    torch.manual_seed(0)
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=2, num_heads=1,
                num_classes=10)
    args.update(kw)
    return DiT(**args)


def randomize(model, seed=1):
    """Random weights everywhere (the adaLN-Zero init would make every block an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_original_key_layout_loads_strictly():
    model = DiT_models["DiT-S/8"](input_size=16, num_classes=10)
    assert sorted(model.state_dict()) == sorted(original_keys(12))
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    DiT_models["DiT-S/8"](input_size=16, num_classes=10).load_state_dict(sd, strict=True)


def test_adaln_zero_init_makes_output_zero():
    model = small().eval()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3]))
    assert out.shape == (2, 8, 8, 8) and torch.count_nonzero(out) == 0


def inputs(n=4, c=4, size=8, num_classes=10):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(n, c, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, num_classes, (n,), generator=g))


def test_sdpa_and_math_agree_forward_and_backward():
    ref = randomize(small(attn_backend="math"))
    fast = randomize(small(attn_backend="sdpa"))
    x, t, y = inputs()
    torch.manual_seed(3)
    out_ref = ref(x, t, y)
    torch.manual_seed(3)
    out_fast = fast(x, t, y)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().mean().backward()
    out_fast.square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fraction", [True, 0.5])
def test_grad_checkpointing_gives_the_same_gradients(fraction):
    x, t, y = inputs()
    grads = []
    for ckpt in (False, fraction):
        model = randomize(small(depth=4, grad_checkpointing=ckpt))
        model.train()
        torch.manual_seed(5)  # same label-dropout draws in both runs
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert sum(b.grad_checkpointing for b in model.blocks) == (4 if fraction is True else 2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_with_cfg_guides_three_channels_by_default():
    model = randomize(small()).eval()
    x, t, _ = inputs()
    x = torch.cat([x[:2], x[:2]])
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        raw = model(x, t, y)
        out3 = model.forward_with_cfg(x, t, y, 4.0)
        out_all = model.forward_with_cfg(x, t, y, 4.0, guide_all_channels=True)
    cond, uncond = raw[:2], raw[2:]
    guided = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(out3[:2, :3], guided[:, :3])
    torch.testing.assert_close(out3[:2, 3:], raw[:2, 3:])       # channel 3 and the variance left alone
    torch.testing.assert_close(out_all[:2, :4], guided[:, :4])
    torch.testing.assert_close(out3[2:, :3], out3[:2, :3])   # guided eps repeated; the rest per half
    torch.testing.assert_close(out3[2:, 3:], raw[2:, 3:])


def test_null_label_is_num_classes_and_any_class_count():
    model = small(num_classes=7)
    assert model.y_embedder.embedding_table.num_embeddings == 8
    model.eval()
    x, t, _ = inputs()
    model(x, t, torch.tensor([0, 6, 7, 7]))  # 7 is the "no class" label


def test_non_square_input_and_pixel_space():
    model = randomize(small(input_size=(8, 12), in_channels=1)).eval()
    out = model(torch.randn(2, 1, 8, 12), torch.tensor([3, 4]), torch.tensor([0, 1]))
    assert out.shape == (2, 2, 8, 12)


def test_compile_fullgraph_matches_eager():
    model = randomize(small()).eval()
    x, t, y = inputs()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-4, atol=1e-5)


def test_bf16_keeps_the_timestep_embedding_exact():
    """998 and 999 are one number in bf16 (both round to 1000): a bf16 model must still see two different
    timesteps, i.e. the sinusoidal features are computed from the exact t and only then rounded."""
    model = randomize(small()).to(torch.bfloat16).eval()
    seen = []
    first_linear = model.t_embedder.mlp[0]
    handle = first_linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = model(torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([998, 999]), torch.tensor([0, 1]))
    finally:
        handle.remove()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    (features,) = seen
    assert features.shape == (2, 256) and features.dtype == torch.bfloat16
    assert not torch.equal(features[0], features[1]), "t = 998 and t = 999 gave the same timestep embedding"


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn_backend="fast"), "unknown attention backend"),
    (dict(fused_adaln="yes"), "fused_adaln must be"),
    (dict(input_size=9), "not divisible by the patch size"),
    (dict(num_classes=0), "num_classes must be"),
    (dict(grad_checkpointing=1.5), "grad_checkpointing must be"),
])
def test_bad_arguments_have_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


def test_wrong_input_size_and_unknown_model_have_clear_errors():
    with pytest.raises(ValueError, match="built for inputs of size"):
        small()(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown model"):
        build_model(ModelConfig(model="DiT-XXL/2", in_channels=4, input_size=8))


def test_missing_backend_raises_clearly(monkeypatch):
    # Import the kernels while the interpreter is on (conftest), as every other test sees them: Triton
    # fixes interpreter mode at import, and only the availability check should see the variable change.
    importlib.import_module("dit_fast_kernels.flash_attention")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = small(attn_backend="triton")
    x, t, y = inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        model(x, t, y)
    model = small(attn_backend="flash_attn")
    with pytest.raises(RuntimeError, match="flash"):
        model(x, t, y)
