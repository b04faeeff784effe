"""REPA's samplers (dit_fast.sampling.repa) in REPA's time (data at t = 0, noise at t = 1).

Checked two independent ways: on a Gaussian data distribution, whose exact velocity is known in
closed form, the ODE maps z to mu + s z and the SDE's samples have the data's mean and spread; and on
a tiny random DiT, step for step against a loop written here from REPA's generate.py recipe (the 2N
batch [z, z] / [y, null], the guided drift in float64, the noise drawn like the float64 state).
"""
import math

import pytest
import torch
from torch import nn

from dit_fast.models import DiT
from dit_fast.sampling import build_sampler
from dit_fast.sampling.repa import drift_coefficients, interpolant, time_grid

MU, S = 0.7, 0.5


class GaussianVelocity(nn.Module):
    """The exact velocity E[d_alpha x + d_sigma eps | x_t] for data x ~ N(MU, S^2) per coordinate
    (every class alike), with DiT's calling interface (forward, forward_with_cfg)."""

    in_channels = 2

    def __init__(self, path_type):
        super().__init__()
        self.path_type = path_type
        self.anchor = nn.Parameter(torch.zeros(()))     # gives the sampler a device
        self.y_embedder = None

    def forward(self, x, t, y):
        t = t.double().view(-1, 1, 1, 1)
        if self.path_type == "linear":
            alpha, sigma, d_alpha, d_sigma = 1 - t, t, -1.0, 1.0
        else:
            h = t * math.pi / 2
            alpha, sigma = torch.cos(h), torch.sin(h)
            d_alpha, d_sigma = -math.pi / 2 * torch.sin(h), math.pi / 2 * torch.cos(h)
        var = alpha ** 2 * S ** 2 + sigma ** 2
        centred = x.double() - alpha * MU
        x_mean = MU + alpha * S ** 2 / var * centred
        eps_mean = sigma / var * centred
        return (d_alpha * x_mean + d_sigma * eps_mean).to(x.dtype)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False):
        half = self.forward(x[: len(x) // 2], t[: len(x) // 2], y)
        return torch.cat([half, half])                  # guidance of equal halves is a no-op


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_ode_maps_noise_to_the_gaussian_quantile(path_type):
    """The probability-flow ODE of a Gaussian is affine: x_0 = MU + S z, whatever the path."""
    torch.manual_seed(0)
    z = torch.randn(64, 2, 2, 2)
    sampler = build_sampler(GaussianVelocity(path_type), path_type, method="repa-ode", num_steps=200,
                            num_classes=10, cfg_scale=1.0, use_cfg=False)
    x0 = sampler.sample(z, torch.zeros(64, dtype=torch.long))
    torch.testing.assert_close(x0, MU + S * z, rtol=0, atol=2e-2)   # Euler: first order
    heun = build_sampler(GaussianVelocity(path_type), path_type, method="repa-ode", num_steps=40,
                         heun=True, num_classes=10, cfg_scale=1.0, use_cfg=False)
    x0 = heun.sample(z, torch.zeros(64, dtype=torch.long))
    torch.testing.assert_close(x0, MU + S * z, rtol=0, atol=5e-3)  # 40 Euler steps alone: ~4e-2
    assert heun.num_model_evaluations == 79


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_samples_have_the_datas_mean_and_spread(path_type):
    torch.manual_seed(1)
    z = torch.randn(2000, 2, 2, 2)          # 16,000 coordinates
    sampler = build_sampler(GaussianVelocity(path_type), path_type, method="repa-sde", num_steps=250,
                            num_classes=10, cfg_scale=1.8, cfg_interval=(0.0, 0.7))
    x0 = sampler.sample(z, torch.zeros(2000, dtype=torch.long))
    assert sampler.num_model_evaluations == 250
    assert abs(x0.mean().item() - MU) < 0.02 and abs(x0.std().item() - S) < 0.02
    assert torch.corrcoef(torch.stack([x0.flatten(), z.flatten()]))[0, 1] < 0.9   # the noise mattered


def test_drift_is_repas_velocity_to_score_formula():
    """d = v - (w_t / 2) s with w_t = 2 t and s = (r v - x) / (sigma^2 - r d_sigma sigma), r = alpha / d_alpha."""
    v, x = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.1, dtype=torch.float64)
    for path_type in ("linear", "cosine"):
        for t in (1.0, 0.6, 0.04):
            alpha, sigma, d_alpha, d_sigma = interpolant(path_type, t)
            r = alpha / d_alpha
            score = (r * v - x) / (sigma ** 2 - r * d_sigma * sigma)
            a, b = drift_coefficients(path_type, t)
            torch.testing.assert_close(a * v + b * x, v - 0.5 * (2 * t) * score)
    sde, ode = time_grid("SDE", 5), time_grid("ODE", 4)
    assert sde == pytest.approx([1.0, 0.76, 0.52, 0.28, 0.04, 0.0]) and ode == [1.0, 0.75, 0.5, 0.25, 0.0]


def _reference_em(model, z, y, num_steps, cfg_scale, low, high, path_type):
    """REPA's Euler-Maruyama as its generate.py runs it, written here from the recipe: state [z, z]
    with labels [y, null] in float64; a guided step runs the 4N batch [state, state] with labels
    [labels, null...] and guides the float64 drift; noise randn_like(state) before the model call;
    the last step (0.04 -> 0) is the drift alone."""
    n = z.shape[0]
    x = torch.cat([z, z]).double()
    labels = torch.cat([y, torch.full_like(y, 1000)])
    times = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    for i in range(num_steps):
        t_cur, t_next = times[i], times[i + 1]
        dt = t_next - t_cur
        guided = cfg_scale > 1 and low <= t_cur <= high
        inp = torch.cat([x, x]) if guided else x
        lab = torch.cat([labels, torch.full_like(labels, 1000)]) if guided else labels
        eps = torch.randn_like(x) if i < num_steps - 1 else None
        t_in = torch.full((inp.shape[0],), t_cur, dtype=torch.float64)
        v = model(inp.float(), t_in.float(), lab).double()
        alpha, sigma, d_alpha, d_sigma = interpolant(path_type, t_cur)
        r = alpha / d_alpha
        score = (r * v - inp) / (sigma ** 2 - r * d_sigma * sigma)
        d = v - 0.5 * (2 * t_cur) * score
        if guided:
            d_c, d_u = d.chunk(2)
            d = d_u + cfg_scale * (d_c - d_u)
        x = x + d * dt + (math.sqrt(2 * t_cur) * eps * math.sqrt(abs(dt)) if eps is not None else 0)
    return x[:n]


@pytest.mark.parametrize("path_type,interval", [("linear", (0.0, 0.7)), ("cosine", (0.3, 1.0))])
def test_sde_matches_a_hand_written_repa_loop(path_type, interval):
    torch.manual_seed(0)
    dit = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
              num_classes=1000, learn_sigma=False).eval()
    with torch.no_grad():                       # adaLN-zero starts at zero output: give it weights
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(3, 4, 4, 4), torch.tensor([1, 7, 999])
    torch.manual_seed(5)
    with torch.no_grad():
        want = _reference_em(dit, z, y, 12, 1.8, *interval, path_type)
    sampler = build_sampler(dit, path_type, method="repa-sde", num_steps=12, cfg_scale=1.8,
                            num_classes=1000, cfg_interval=interval)
    torch.manual_seed(5)
    got = sampler.sample(z, y)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert sampler.plain_step is not None       # the interval did switch guidance off somewhere
