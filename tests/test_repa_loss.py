"""REPA's objective (dit_fast.repa.SILoss): the alignment loss against the paper's formula computed
token by token in float64, and the whole loss against a hand computation that draws t, then the noise."""
import math

import pytest
import torch

from dit_fast.repa import REPAModel, SILoss, alignment_loss, build_projector
from dit_fast.models import DiT


def paper_alignment(zs, zs_tilde):
    """-1/N sum_n 1/T sum_t cos(z[n, t], h[n, t]), averaged over encoders; loops, float64."""
    per_encoder = []
    for z, h in zip(zs, zs_tilde):
        z, h = z.double(), h.double()
        total = 0.0
        for n in range(z.shape[0]):
            cosines = [torch.dot(z[n, t], h[n, t]) / (z[n, t].norm() * h[n, t].norm())
                       for t in range(z.shape[1])]
            total += -sum(cosines) / len(cosines)
        per_encoder.append(total / z.shape[0])
    return sum(per_encoder) / len(per_encoder)


def test_alignment_loss_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 4, generator=g)]
    zs_tilde = [torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 4, generator=g)]
    got = alignment_loss(zs, zs_tilde)
    assert got.shape == ()
    assert got.item() == pytest.approx(paper_alignment(zs, zs_tilde).item(), rel=1e-6, abs=1e-7)
    # Identical directions (any positive scale) give -1, opposite ones +1.
    assert alignment_loss(zs, [2.5 * z for z in zs]).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss(zs, [-z for z in zs]).item() == pytest.approx(1.0, abs=1e-6)


class Recorder(torch.nn.Module):
    """A stand-in model: output and projections from x_t and t, recording what it was called with."""

    def __init__(self, z_dim=6):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = torch.randn(4, z_dim, generator=g)

    def forward(self, x, t, y):
        self.seen = (x.clone(), t.clone(), y)
        tokens = x.flatten(2).transpose(1, 2)                   # (N, H*W, C)
        return 0.5 * x + t.view(-1, 1, 1, 1), [tokens @ self.w]


def hand_siloss(images, zs, path_type, weighting, model):
    """SILoss drawn by hand: t (CPU, float32, (N,1,1,1)) first, then the noise like the images."""
    N = images.shape[0]
    if weighting == "uniform":
        t = torch.rand(N, 1, 1, 1)
    else:
        sigma = torch.randn(N, 1, 1, 1).exp()      # REPA: ln sigma ~ N(0, 1)
        t = sigma / (1 + sigma) if path_type == "linear" else torch.atan(sigma) * 2 / math.pi
    noise = torch.randn_like(images)
    if path_type == "linear":
        x_t, v = (1 - t) * images + t * noise, noise - images
    else:
        a, s = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
        x_t, v = a * images + s * noise, math.pi / 2 * (a * noise - s * images)
    out, zs_tilde = model(x_t, t.flatten(), None)
    denoise = ((out - v) ** 2).flatten(1).mean(1)
    return denoise, paper_alignment(zs, zs_tilde), (x_t, t.flatten())


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
def test_siloss_equals_a_hand_computation_drawing_t_then_noise(path_type, weighting):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 4, 3, 3, generator=g)
    zs = [torch.randn(4, 9, 6, generator=g)]
    model = Recorder()
    torch.manual_seed(123)
    want_denoise, want_proj, (want_xt, want_t) = hand_siloss(images, zs, path_type, weighting, model)
    torch.manual_seed(123)
    loss = SILoss(prediction="v", path_type=path_type, weighting=weighting)
    denoise, proj = loss(model, images, dict(y=None), zs=zs)
    x_t, t, _ = model.seen
    torch.testing.assert_close(t, want_t, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_t, want_xt, rtol=1e-5, atol=1e-6)
    assert denoise.shape == (4,)
    torch.testing.assert_close(denoise, want_denoise, rtol=1e-5, atol=1e-6)
    assert proj.item() == pytest.approx(want_proj.item(), rel=1e-5, abs=1e-6)
    assert ((0 < t) & (t < 1)).all()


def test_siloss_rejects_what_repa_does_not_train():
    for kwargs in (dict(prediction="eps"), dict(path_type="vp"), dict(weighting="cosine")):
        with pytest.raises(ValueError):
            SILoss(**kwargs)


def test_projector_and_model_get_gradients_through_repa_model():
    torch.manual_seed(0)
    dit = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
              num_classes=5, learn_sigma=False)
    projector = build_projector(32, projector_dim=16, z_dim=6)
    layout = [type(m).__name__ for m in projector]
    assert layout == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [tuple(m.weight.shape) for m in projector[::2]] == [(16, 32), (16, 16), (6, 16)]
    model = REPAModel(dit, [projector], encoder_depth=2)
    assert set(model.state_dict()) == {f"dit.{k}" for k in dit.state_dict()} | \
        {f"projectors.0.{k}" for k in projector.state_dict()}
    images = torch.randn(2, 4, 4, 4)
    zs = [torch.randn(2, 4, 6)]
    denoise, proj = SILoss()(model, images, dict(y=torch.tensor([1, 3])), zs)
    (denoise.mean() + 0.5 * proj).backward()
    for name, p in projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Blocks after the tap still learn from the denoising loss (zero-init adaLN lets only some move).
    assert dit.final_layer.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        REPAModel(dit, [projector], encoder_depth=4)


def test_repa_option_lists_agree_with_the_config():
    """repa.loss keeps its own copy (config imports the repa package, so it cannot import config)."""
    from dit_fast.config import REPA_PATH_TYPES, REPA_WEIGHTINGS
    from dit_fast.repa import loss
    assert (loss.PATH_TYPES, loss.WEIGHTINGS) == (REPA_PATH_TYPES, REPA_WEIGHTINGS)
