"""REPA's frozen encoder: a tiny random DINOv2 (and one with registers) saved with save_pretrained and
loaded back through dit_fast.repa.load_encoder; nothing is downloaded."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,  # noqa: E402
                          Dinov2WithRegistersModel)

from dit_fast.models import DiT  # noqa: E402
from dit_fast.repa import (REPAModel, SILoss, build_projector, encoder_input_size, load_encoder,  # noqa: E402
                           preprocess_raw_image)

TINY = dict(image_size=28, patch_size=14, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48)


def save_tiny(tmp_path, registers=0):
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **TINY))
    else:
        model = Dinov2Model(Dinov2Config(**TINY))
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def test_preprocessing_is_repas():
    assert [encoder_input_size(r) for r in (256, 512, 64)] == [224, 448, 56]
    for bad in (100, 0):
        with pytest.raises(ValueError):
            encoder_input_size(bad)
    # A flat colour stays flat through the bicubic resize: (c / 255 - mean) / std everywhere.
    colour = torch.tensor([10, 128, 250], dtype=torch.uint8)
    images = colour.view(1, 3, 1, 1).expand(2, 3, 256, 256)
    x = preprocess_raw_image(images)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    want = (colour.float() / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x, want.view(1, 3, 1, 1).expand_as(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("registers", [0, 4])
def test_patch_tokens_after_the_final_norm_without_class_and_register_tokens(tmp_path, registers):
    enc_type = "dinov2reg-vit-b" if registers else "dinov2-vit-b"
    encoder = load_encoder(enc_type, save_tiny(tmp_path, registers), resolution=64)
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    # The 2 x 2 position table was resampled once to the 4 x 4 grid of a 56 px input.
    assert encoder.model.embeddings.position_embeddings.shape == (1, 1 + 16, 24)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 24) and tokens.grad_fn is None
    states = encoder.model(pixel_values=preprocess_raw_image(images), output_hidden_states=True)
    normed = encoder.model.layernorm(states.hidden_states[-1])      # (N, 1 + R + 16, D)
    assert normed.shape[1] == 1 + registers + 16
    torch.testing.assert_close(tokens, normed[:, 1 + registers:], rtol=0, atol=0)


def test_wrong_encoder_kind_is_refused(tmp_path):
    path = save_tiny(tmp_path)
    with pytest.raises(ValueError, match="dinov2_with_registers"):
        load_encoder("dinov2reg-vit-b", path, resolution=64)
    for bad in ("dinov2-vit-x", "mocov3-vit-b", "dinov2b"):
        with pytest.raises(ValueError, match="--enc-type"):
            load_encoder(bad, path, resolution=64)


def test_projector_learns_and_the_encoder_gets_no_gradient(tmp_path):
    encoder = load_encoder("dinov2-vit-b", save_tiny(tmp_path), resolution=32)   # 2 x 2 tokens
    torch.manual_seed(0)
    dit = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
              num_classes=3, learn_sigma=False)
    model = REPAModel(dit, [build_projector(32, 16, encoder.embed_dim)], encoder_depth=1)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    zs = [encoder(images)]
    denoise, proj = SILoss()(model, torch.randn(2, 4, 4, 4), dict(y=torch.tensor([0, 2])), zs)
    (denoise.mean() + 0.5 * proj).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projectors.parameters())
    assert all(p.grad is None for p in encoder.parameters())
