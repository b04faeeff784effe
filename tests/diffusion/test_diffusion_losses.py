"""Forward process, posterior and training losses against direct computations."""
import math

import numpy as np
import pytest
import torch

from dit_fast.diffusion import create_diffusion, normal_kl


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_q_sample_closed_form():
    d = create_diffusion("")
    g = _gen()
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 321, 999])
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    torch.testing.assert_close(d.q_sample(x0, t, noise=noise).double(), expected, rtol=1e-6, atol=1e-6)


def test_q_posterior_matches_gaussian_product():
    # Independent derivation: q(x_{t-1}|x_t,x_0) ~ N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1})
    # * N(x_t; sqrt(alpha_t) x_{t-1}, beta_t): precision-weighted combination.
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    g = _gen(1)
    x0, xt = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    t = torch.tensor([5, 700])
    b, ab, abp = (torch.from_numpy(a)[t].view(-1, 1, 1, 1) for a in (d.betas, d.alphas_cumprod, d.alphas_cumprod_prev))
    prec = (1 - b) / b + 1 / (1 - abp)
    mean = (torch.sqrt(1 - b) / b * xt.double() + torch.sqrt(abp) / (1 - abp) * x0.double()) / prec
    m, v, logv = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(m.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.double(), (1 / prec).expand_as(v), rtol=1e-5, atol=0)
    torch.testing.assert_close(logv.exp().double(), (1 / prec).expand_as(v), rtol=1e-5, atol=0)


class _Fixed:
    """A 'model' returning a fixed output (N, 2C, H, W): eps prediction and variance values."""

    def __init__(self, out):
        self.out = out

    def __call__(self, x, t, **kwargs):
        return self.out


def _toy_case(seed=0, N=2, C=2, H=4):
    g = _gen(seed)
    # x0 on the 8-bit grid with both edge values present (edge bins of the decoder NLL)
    x0 = torch.randint(0, 256, (N, C, H, H), generator=g).float() / 127.5 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    noise = torch.randn(N, C, H, H, generator=g)
    out = torch.cat([torch.randn(N, C, H, H, generator=g) * 0.3,
                     torch.rand(N, C, H, H, generator=g) * 2 - 1], dim=1)
    return x0, noise, out


def _model_gaussian(d, x0, noise, out, t):
    C = x0.shape[1]
    xt = d.q_sample(x0, t, noise=noise)
    eps, v = out[:, :C].double(), out[:, C:].double()
    ix = lambda a: torch.from_numpy(a)[t].view(-1, 1, 1, 1)
    pred_x0 = (xt.double() - ix(np.sqrt(1 - d.alphas_cumprod)) * eps) / ix(np.sqrt(d.alphas_cumprod))
    mean = ix(d.posterior_mean_coef1) * pred_x0 + ix(d.posterior_mean_coef2) * xt.double()
    frac = (v + 1) / 2
    logvar = frac * ix(np.log(d.betas)) + (1 - frac) * ix(d.posterior_log_variance_clipped)
    return xt, mean, logvar


def test_training_losses_mse_and_vb_direct():
    d = create_diffusion("")
    x0, noise, out = _toy_case()
    t = torch.tensor([0, 400])
    terms = d.training_losses(_Fixed(out), x0, t, noise=noise)
    C = x0.shape[1]
    mse = ((noise - out[:, :C]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], mse, rtol=1e-6, atol=0)
    xt, mean_p, logvar_p = _model_gaussian(d, x0, noise, out, t)
    # t = 400: KL between the true posterior and the model's Gaussian, bits per dim
    m_q, _, logv_q = d.q_posterior_mean_variance(x0, xt, t)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(m_q.double(), (0.5 * logv_q.double()).exp()),
        torch.distributions.Normal(mean_p, (0.5 * logvar_p).exp()),
    )
    assert terms["vb"][1].item() == pytest.approx(kl[1].mean().item() / math.log(2), rel=1e-4)
    # t = 0: discretised decoder NLL with the tanh CDF, evaluated directly in float64
    cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    s = (0.5 * logvar_p[0]).exp()
    x = x0[0].double()
    hi, lo = cdf((x - mean_p[0] + 1 / 255) / s), cdf((x - mean_p[0] - 1 / 255) / s)
    p = torch.where(x < -0.999, hi, torch.where(x > 0.999, 1 - lo, hi - lo)).clamp(min=1e-12)
    assert terms["vb"][0].item() == pytest.approx((-p.log()).mean().item() / math.log(2), rel=1e-4)
    assert torch.isfinite(terms["vb"]).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_term_trains_only_the_variance_channels():
    d = create_diffusion("")
    x0, noise, out = _toy_case(2)
    out.requires_grad_(True)
    d.training_losses(_Fixed(out), x0, torch.tensor([3, 900]), noise=noise)["vb"].sum().backward()
    C = x0.shape[1]
    assert out.grad[:, :C].abs().max() == 0 and out.grad[:, C:].abs().max() > 0


def test_loss_scalings():
    x0, noise, out = _toy_case(3)
    t = torch.tensor([0, 100])
    plain = create_diffusion("250").training_losses(_Fixed(out), x0, t, noise=noise)
    rescaled = create_diffusion("250", rescale_learned_sigmas=True).training_losses(_Fixed(out), x0, t, noise=noise)
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.25)
    kl = create_diffusion("250", use_kl=True).training_losses(_Fixed(out), x0, t, noise=noise)
    assert set(kl) == {"loss"}
    torch.testing.assert_close(kl["loss"], plain["vb"] * 250)


def test_fixed_sigma_and_predict_xstart():
    x0, noise, out = _toy_case(4)
    C = x0.shape[1]
    d = create_diffusion("", learn_sigma=False, predict_xstart=True)
    terms = d.training_losses(_Fixed(out[:, :C]), x0, torch.tensor([1, 2]), noise=noise)
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["mse"], ((x0 - out[:, :C]) ** 2).mean(dim=(1, 2, 3)))
    p = d.p_mean_variance(_Fixed(out[:, :C]), x0, torch.tensor([0, 5]), clip_denoised=False)
    torch.testing.assert_close(p["pred_xstart"], out[:, :C])
    assert p["variance"][0, 0, 0, 0].item() == pytest.approx(d.posterior_variance[1], rel=1e-6)
    assert p["variance"][1, 0, 0, 0].item() == pytest.approx(d.betas[5], rel=1e-6)
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    p = small.p_mean_variance(_Fixed(out[:, :C]), x0, torch.tensor([0, 5]))
    assert p["variance"][1, 0, 0, 0].item() == pytest.approx(small.posterior_variance[5], rel=1e-6)
    assert set(p) == {"mean", "variance", "log_variance", "pred_xstart", "extra"}


def test_normal_kl_matches_torch_distributions():
    g = _gen(5)
    m1, m2, l1, l2 = (torch.randn(10, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * l1).exp()), torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), expected)
    torch.testing.assert_close(normal_kl(m1, l1, 0.0, 0.0), normal_kl(m1, l1, torch.zeros(10, dtype=torch.float64),
                                                                      torch.zeros(10, dtype=torch.float64)))


def test_wrong_model_channels_raise():
    d = create_diffusion("")
    x0, noise, out = _toy_case(6)
    with pytest.raises(ValueError, match="learn_sigma"):
        d.training_losses(_Fixed(out[:, :2]), x0, torch.tensor([1, 2]), noise=noise)
    with pytest.raises(ValueError, match="t must have shape"):
        d.p_mean_variance(_Fixed(out), x0, torch.tensor([1]))
