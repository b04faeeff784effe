"""DDPM / DDIM sampling loops: determinism, noise order, device handling, no per-step copies."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from dit_fast.diffusion import create_diffusion


class Toy(nn.Module):
    """A tiny conv 'DiT': (N, C, H, W), t -> (N, 2C or C, H, W); the variance half lies in [-1, 1]."""

    def __init__(self, C=2, learn_sigma=True):
        super().__init__()
        torch.manual_seed(0)
        self.C, self.learn_sigma = C, learn_sigma
        self.conv = nn.Conv2d(C + 1, 2 * C if learn_sigma else C, 3, padding=1)

    def forward(self, x, t, y=None):
        tt = (t.float() / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        out = self.conv(torch.cat([x, tt], 1))
        if self.learn_sigma:
            out = torch.cat([out[:, :self.C], torch.tanh(out[:, self.C:])], 1)
        return out


SHAPE = (2, 2, 4, 4)


def test_p_sample_loop_seeded_determinism():
    d, m = create_diffusion("20"), Toy()
    torch.manual_seed(7)
    a = d.p_sample_loop(m, SHAPE)
    torch.manual_seed(7)
    b = d.p_sample_loop(m, SHAPE)
    torch.manual_seed(8)
    c = d.p_sample_loop(m, SHAPE)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddpm_draws_noise_in_original_order():
    # x_T = randn(*shape); then per step (after the model call, t = 0 included) one randn_like.
    d, m = create_diffusion("10"), Toy()
    torch.manual_seed(3)
    got = d.p_sample_loop(m, SHAPE)
    torch.manual_seed(3)
    x = torch.randn(*SHAPE)
    for i in reversed(range(10)):
        t = torch.full((SHAPE[0],), i)
        out = d.p_mean_variance(m, x, t)
        noise = torch.randn_like(x)
        x = out["mean"] + float(i != 0) * torch.exp(0.5 * out["log_variance"]) * noise
    assert torch.equal(got, x)


def test_ddim_eta0_deterministic_given_noise():
    d, m = create_diffusion("ddim10"), Toy()
    z = torch.randn(*SHAPE)
    torch.manual_seed(1)
    a = d.ddim_sample_loop(m, SHAPE, noise=z.clone())
    torch.manual_seed(2)
    b = d.ddim_sample_loop(m, SHAPE, noise=z.clone())
    assert torch.equal(a, b)
    torch.manual_seed(1)
    c = d.ddim_sample_loop(m, SHAPE, noise=z.clone(), eta=1.0)
    torch.manual_seed(2)
    e = d.ddim_sample_loop(m, SHAPE, noise=z.clone(), eta=1.0)
    assert not torch.equal(c, e)


def test_ddim_step_by_hand():
    d, m = create_diffusion("ddim10"), Toy()
    x, t = torch.randn(*SHAPE), torch.tensor([5, 5])
    out = d.ddim_sample(m, x, t, clip_denoised=False)
    p = d.p_mean_variance(m, x, t, clip_denoised=False)
    ab, abp = d.alphas_cumprod[5], d.alphas_cumprod_prev[5]
    eps = (x - ab**0.5 * p["pred_xstart"]) / (1 - ab) ** 0.5
    torch.testing.assert_close(out["sample"], abp**0.5 * p["pred_xstart"] + (1 - abp) ** 0.5 * eps,
                               rtol=1e-4, atol=1e-5)


def test_progressive_yields_every_step_and_progress_bar(capsys):
    d, m = create_diffusion("5"), Toy()
    steps = list(d.p_sample_loop_progressive(m, SHAPE, progress=True))
    assert len(steps) == 5 and set(steps[-1]) == {"sample", "pred_xstart"}
    steps = list(d.ddim_sample_loop_progressive(m, SHAPE, eta=0.5, progress=True))
    assert len(steps) == 5
    assert "5/5" in capsys.readouterr().err


def test_function_model_uses_noise_device_and_fixed_sigma():
    d, m = create_diffusion("4", learn_sigma=False), Toy(learn_sigma=False)
    fn = lambda x, t, y=None: m(x, t)  # like a bound forward_with_cfg: no .parameters()
    out = d.p_sample_loop(fn, SHAPE, noise=torch.randn(*SHAPE), model_kwargs={"y": None})
    assert out.shape == SHAPE and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="device="):
        d.p_sample_loop(fn, SHAPE)
    with pytest.raises(ValueError, match="noise has shape"):
        d.p_sample_loop(fn, SHAPE, noise=torch.randn(1, 2, 4, 4))


def test_loop_makes_no_host_to_device_tensors(monkeypatch):
    d, m = create_diffusion("6"), Toy()
    d.p_sample_loop(m, SHAPE)  # warm-up builds the per-device tables once

    def forbidden(*a, **k):
        raise AssertionError("per-step torch.tensor / from_numpy inside the sampling loop")

    monkeypatch.setattr(torch, "tensor", forbidden)
    monkeypatch.setattr(torch, "from_numpy", forbidden)
    d.p_sample_loop(m, SHAPE)
    d.ddim_sample_loop(m, SHAPE, eta=0.3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loop_has_no_sync():
    d, m = create_diffusion("ddim10"), Toy().cuda()
    shape = (4, 2, 8, 8)
    d.ddim_sample_loop(m, shape, device="cuda")
    d.p_sample_loop(m, shape, device="cuda")  # warm-up: tables and timestep map on the GPU
    schedule = d.schedule_on(torch.device("cuda", 0))
    assert all(getattr(schedule, f.name).device.type == "cuda" for f in dataclasses.fields(schedule))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.manual_seed(0)
        a = d.p_sample_loop(m, shape, device="cuda")
        b = d.ddim_sample_loop(m, shape, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_predrawn_step_noise_matches_internal_draw():
    d, m = create_diffusion("10"), Toy()
    x, t = torch.randn(*SHAPE), torch.tensor([4, 4])
    torch.manual_seed(11)
    a = d.p_sample(m, x, t)["sample"]
    torch.manual_seed(11)
    b = d.p_sample(m, x, t, noise=torch.randn_like(x))["sample"]
    torch.manual_seed(11)
    c = d.ddim_sample(m, x, t, eta=0.7)["sample"]
    torch.manual_seed(11)
    e = d.ddim_sample(m, x, t, eta=0.7, noise=torch.randn_like(x))["sample"]
    assert torch.equal(a, b) and torch.equal(c, e)
