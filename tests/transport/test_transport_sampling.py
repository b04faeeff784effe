"""The samplers on a problem with a known answer: Gaussian data x1 ~ N(mu, s^2 I). Then
x_t = alpha_t x1 + sigma_t x0 ~ N(alpha_t mu, v_t I) with v_t = alpha_t^2 s^2 + sigma_t^2, the exact
velocity is alpha'_t mu + (alpha_t alpha'_t s^2 + sigma_t sigma'_t) / v_t (x - alpha_t mu), and the
probability-flow ODE is the affine map x_t = m_t + sqrt(v_t / v_t0) (x_t0 - m_t0), point by point."""
import math
import sys

import pytest
import torch

from dit_fast.transport import Sampler, create_transport
from dit_fast.transport import integrators
from transport_closed_forms import coefficients

MU, S = 1.5, 0.5


def moments(path, t):
    a, _, s, _ = coefficients(path, torch.as_tensor(t, dtype=torch.float64))
    return a * MU, a ** 2 * S ** 2 + s ** 2


def exact_model(path, prediction):
    """The Gaussian law's exact velocity, score or noise prediction as a model(x, t)."""
    def model(x, t):
        a, da, s, ds = (c.view(-1, 1, 1, 1).to(x.dtype) for c in coefficients(path, t))
        var = a ** 2 * S ** 2 + s ** 2
        centred = x - a * MU
        if prediction == "velocity":
            return da * MU + (da * a * S ** 2 + ds * s) / var * centred
        if prediction == "score":
            return -centred / var
        return s / var * centred
    return model


def flow_map(path, z, t0, t1):
    (m0, v0), (m1, v1) = moments(path, t0), moments(path, t1)
    return (m1 + torch.sqrt(v1 / v0) * (z.double() - m0)).float()


def interval(transport, reverse=False):
    return transport.check_interval(transport.train_eps, transport.sample_eps, eval=True, reverse=reverse)


ODE_CASES = [("Linear", "velocity", "euler", 100, 5e-2), ("Linear", "velocity", "heun2", 40, 2e-3),
             ("Linear", "velocity", "midpoint", 40, 2e-4), ("GVP", "velocity", "heun2", 60, 2e-3),
             ("VP", "velocity", "heun2", 100, 1e-3), ("Linear", "score", "heun2", 100, 1e-3),
             ("GVP", "noise", "heun2", 100, 1e-3), ("VP", "noise", "heun2", 100, 1e-3)]


@pytest.mark.parametrize("path, prediction, method, steps, tol", ODE_CASES)
def test_fixed_step_ode_follows_the_exact_flow_map(path, prediction, method, steps, tol):
    transport = create_transport(path, prediction)
    z = torch.randn(512, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    out = Sampler(transport).sample_ode(sampling_method=method, num_steps=steps)(z, exact_model(path, prediction))
    assert out.shape == (steps, *z.shape) and torch.equal(out[0], z)
    t0, t1 = interval(transport)
    torch.testing.assert_close(out[-1], flow_map(path, z, t0, t1), rtol=0, atol=tol)
    mean, var = moments(path, t1)
    assert abs(out[-1].mean().item() - mean.item()) < 0.05 and abs(out[-1].var().item() / var.item() - 1) < 0.1


def test_solver_orders():
    """Halving the step halves Euler's error and quarters Heun's and the midpoint rule's."""
    z = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model, exact = exact_model("GVP", "velocity"), flow_map("GVP", z, 0.0, 1.0).double()
    sampler = Sampler(create_transport("GVP"))
    for method, order in (("euler", 1), ("heun2", 2), ("midpoint", 2)):
        errors = [(sampler.sample_ode(sampling_method=method, num_steps=n + 1)(z, model)[-1] - exact).abs().max()
                  for n in (20, 40)]
        assert abs(math.log2(errors[0] / errors[1]) - order) < 0.2, (method, errors)


def test_reverse_ode_maps_data_back_to_noise():
    sampler, model = Sampler(create_transport("Linear", "velocity")), exact_model("Linear", "velocity")
    z = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    data = sampler.sample_ode(sampling_method="heun2", num_steps=50)(z, model)[-1]
    back = sampler.sample_ode(sampling_method="heun", num_steps=50, reverse=True)(data, model)[-1]
    torch.testing.assert_close(back, z, rtol=0, atol=1e-4)


def test_adaptive_ode_from_torchdiffeq():
    pytest.importorskip("torchdiffeq")
    transport = create_transport("VP", "score")
    z = torch.randn(64, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    out = Sampler(transport).sample_ode(num_steps=5, atol=1e-7, rtol=1e-6)(z, exact_model("VP", "score"))
    t0, t1 = interval(transport)
    ts = torch.linspace(t0, t1, 5)
    assert out.shape == (5, *z.shape)
    for k in (2, 4):   # the saved points are the states at the grid times
        torch.testing.assert_close(out[k], flow_map("VP", z, t0, ts[k].item()), rtol=0, atol=2e-4)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_step_solvers_equal_torchdiffeq_bit_for_bit(method, reverse, dtype):
    """SiT ran these through torchdiffeq; ours must give the very same numbers, in low precision too
    (where the operand order of dt * f and the time's cast to the state's dtype show)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f = lambda t, y: (torch.tanh(y) * (1 + t) - 0.3 * y).to(y.dtype)  # noqa: E731
    y0 = torch.randn(3, 4, 5).to(dtype)
    grid = torch.linspace(0.0, 0.96, 13)
    grid = grid.flip(0) if reverse else grid
    ours = integrators.solve_fixed(f, y0, grid, method)
    assert torch.equal(ours, torchdiffeq.odeint(f, y0, grid, method=method))


def test_missing_torchdiffeq_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    fn = Sampler(create_transport()).sample_ode(sampling_method="dopri5")
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        fn(torch.zeros(1, 1, 1, 1), exact_model("Linear", "velocity"))
    fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=3)   # needs nothing
    assert fn(torch.zeros(1, 1, 1, 1), exact_model("Linear", "velocity")).shape == (3, 1, 1, 1, 1)


@pytest.mark.parametrize("method", ["Euler", "Heun"])
def test_sde_reaches_the_marginal(method):
    """Many SDE samples: before the last step they follow N(m_t1, v_t1); the "Mean" last step then is
    x + h (v + w score) applied to them."""
    torch.manual_seed(4)
    transport = create_transport("Linear", "velocity")
    model = exact_model("Linear", "velocity")
    z = torch.randn(20000, 1, 1, 1)
    states = Sampler(transport).sample_sde(sampling_method=method, diffusion_form="sigma", num_steps=100)(z, model)
    assert isinstance(states, list) and len(states) == 100
    mean, var = moments("Linear", 0.96)
    before = states[-2].double()
    assert abs(before.mean() - mean) < 4 * math.sqrt(var / 20000) + 0.01
    assert abs(before.var() / var - 1) < 0.05
    t = torch.full((20000,), 0.96)
    score = -(before - 0.96 * MU) / var
    want = before + 0.04 * (model(before, t) + (1 - 0.96) * score)
    torch.testing.assert_close(states[-1].double(), want, rtol=0, atol=1e-5)


def test_sde_last_steps_are_their_formulas():
    transport = create_transport("Linear", "velocity")
    model = exact_model("Linear", "velocity")
    z = torch.randn(8, 1, 2, 2)

    def run(last_step):
        torch.manual_seed(5)
        return Sampler(transport).sample_sde(diffusion_form="linear", last_step=last_step, num_steps=20)(z, model)
    none, tweedie, euler = run(None), run("Tweedie"), run("Euler")
    assert torch.equal(none[-1], none[-2])             # no last step, and the grid then ends at t = 1
    x, t = tweedie[-2], torch.full((8,), 0.96)
    var = 0.96 ** 2 * S ** 2 + 0.04 ** 2
    posterior_mean = MU + 0.96 * S ** 2 / var * (x - 0.96 * MU)   # E[x1 | x_t], the Gaussian's own
    torch.testing.assert_close(tweedie[-1], posterior_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(euler[-1], euler[-2] + 0.04 * model(euler[-2], t), rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError):
        Sampler(transport).sample_sde(last_step="Median")


def test_sde_noise_stream_and_device_option():
    """Seeded Euler-Maruyama equals a hand loop drawing the CPU generator's randn each step."""
    transport = create_transport("GVP", "velocity")
    model = exact_model("GVP", "velocity")
    z = torch.randn(4, 1, 2, 2)
    torch.manual_seed(6)
    got = Sampler(transport).sample_sde(diffusion_form="sigma", last_step=None, num_steps=6)(z, model)
    torch.manual_seed(6)
    grid, x = torch.linspace(0, 1, 6), z   # no last step: t1 = 1 - sample_eps = 1
    dt = grid[1] - grid[0]
    for k in range(5):
        noise = torch.randn(x.shape) * torch.sqrt(dt)
        t = torch.full((4,), grid[k].item())
        sigma = torch.cos(math.pi / 2 * t).view(-1, 1, 1, 1)
        v = model(x, t)
        score = transport.path_sampler.score_from_velocity(v, x, t)
        x = x + (v + sigma * score) * dt + torch.sqrt(2 * sigma) * noise
        torch.testing.assert_close(got[k], x, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)
    on_device = Sampler(transport).sample_sde(diffusion_form="sigma", last_step=None, num_steps=6,
                                              noise_on_device=True)(z, model)
    assert len(on_device) == 6 and torch.isfinite(on_device[-1]).all()


def test_likelihood_of_gaussian_data():
    """The exact velocity is linear with Jacobian c(t) I, so Hutchinson's estimate is exact and
    log p(x) must be the Gaussian's log density."""
    x = MU + S * torch.randn(32, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    logp, noise = Sampler(create_transport()).sample_ode_likelihood(sampling_method="heun2", num_steps=200)(
        x, exact_model("Linear", "velocity"))
    exact = torch.distributions.Normal(MU, S).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(logp, exact, rtol=0, atol=1e-3)
    torch.testing.assert_close(noise, (x - MU) / S, rtol=0, atol=1e-3)


def test_fixed_step_loops_never_read_back_to_the_host():
    """On the meta device any host read (.item(), a tensor in an if) raises: the fixed-step ODE and the
    SDE with on-device noise run there, so their loops can be captured by torch.compile / CUDA graphs."""
    z = torch.empty(2, 4, 8, 8, device="meta")
    model = lambda x, t, y: x * t.view(-1, 1, 1, 1)  # noqa: E731
    sampler = Sampler(create_transport("GVP", "noise"))
    for method in integrators.FIXED_STEP_METHODS:
        assert sampler.sample_ode(sampling_method=method, num_steps=4)(z, model, y=None).device.type == "meta"
    states = sampler.sample_sde(num_steps=4, noise_on_device=True)(z, model, y=None)
    assert states[-1].device.type == "meta"
