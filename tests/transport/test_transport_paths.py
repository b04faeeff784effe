"""The interpolant paths against closed forms written here independently (float64): alpha_t, sigma_t,
their derivatives (also by finite differences), the probability-flow drift, the SDE diffusion forms, and
the velocity / score / noise conversions (also against the exact fields of a Gaussian data law)."""
import math

import pytest
import torch

from dit_fast.transport import GVPPath, LinearPath, VPPath, create_transport
from dit_fast.transport.paths import ICPlan, VPCPlan
from transport_closed_forms import B_MAX, B_MIN, coefficients

TIMES = torch.tensor([0.05, 0.3, 0.5, 0.71, 0.93], dtype=torch.float64)
CLOSED = {name: (lambda t, n=name: coefficients(n, t)[0], lambda t, n=name: coefficients(n, t)[2])
          for name in ("Linear", "GVP", "VP")}   # path -> (alpha(t), sigma(t))
PATHS = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}


def derivative(f, t, h=1e-6):
    return (f(t + h) - f(t - h)) / (2 * h)


def as_tensor(value, like):
    return torch.as_tensor(value, dtype=like.dtype).expand_as(like)


@pytest.mark.parametrize("name", list(PATHS))
def test_coefficients_match_closed_forms_and_finite_differences(name):
    path, (alpha, sigma) = PATHS[name](), CLOSED[name]
    a, da = path.alpha(TIMES)
    s, ds = path.sigma(TIMES)
    torch.testing.assert_close(as_tensor(a, TIMES), alpha(TIMES), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(as_tensor(s, TIMES), sigma(TIMES), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(as_tensor(da, TIMES), derivative(alpha, TIMES), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(as_tensor(ds, TIMES), derivative(sigma, TIMES), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(as_tensor(path.d_log_alpha(TIMES), TIMES),
                               derivative(alpha, TIMES) / alpha(TIMES), rtol=1e-7, atol=1e-9)


def test_end_points_noise_at_zero_data_at_one():
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for name in ("Linear", "GVP"):
        a, _ = PATHS[name]().alpha(ends)
        s, _ = PATHS[name]().sigma(ends)
        torch.testing.assert_close(as_tensor(a, ends), ends, atol=1e-15, rtol=0)
        torch.testing.assert_close(as_tensor(s, ends), 1 - ends, atol=1e-15, rtol=0)
    a, _ = VPPath().alpha(ends)   # VP only approaches pure noise: alpha_0 = exp(-(0.1 + 9.95) / 2)
    assert a[1] == 1 and abs(a[0].item() - math.exp(-0.5 * (B_MIN + 0.5 * (B_MAX - B_MIN)))) < 1e-15


@pytest.mark.parametrize("name", list(PATHS))
def test_probability_flow_drift(name):
    """v = (da/a) x + ((da/a) s^2 - s ds) score: drift_mean = -(da/a) x, drift_var the bracket."""
    path, (alpha, sigma) = PATHS[name](), CLOSED[name]
    x = torch.randn(len(TIMES), 3, 2, 2, dtype=torch.float64)
    rate = (derivative(alpha, TIMES) / alpha(TIMES)).view(-1, 1, 1, 1)
    s, ds = sigma(TIMES).view(-1, 1, 1, 1), derivative(sigma, TIMES).view(-1, 1, 1, 1)
    drift_mean, drift_var = path.score_drift(x, TIMES)
    torch.testing.assert_close(drift_mean, -rate * x, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(as_tensor(drift_var, rate), rate * s ** 2 - s * ds, rtol=1e-6, atol=1e-9)


def gaussian_fields(name, t, x, mu, var_data):
    """Exact velocity, score and E[x0 | x_t] of x_t = alpha x1 + sigma x0, x1 ~ N(mu, var_data), x0 ~ N(0, 1)."""
    alpha, sigma = CLOSED[name]
    a, s = alpha(t).view(-1, 1, 1, 1), sigma(t).view(-1, 1, 1, 1)
    da, ds = derivative(alpha, t).view(-1, 1, 1, 1), derivative(sigma, t).view(-1, 1, 1, 1)
    var = a ** 2 * var_data + s ** 2
    centred = x - a * mu
    velocity = da * mu + (da * a * var_data + ds * s) / var * centred
    return velocity, -centred / var, s / var * centred


@pytest.mark.parametrize("name", list(PATHS))
def test_conversions_agree_with_a_gaussian_law(name):
    path = PATHS[name]()
    x = torch.randn(len(TIMES), 2, 3, 3, dtype=torch.float64)
    velocity, score, noise = gaussian_fields(name, TIMES, x, mu=0.7, var_data=0.25)
    torch.testing.assert_close(path.score_from_velocity(velocity, x, TIMES), score, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(path.noise_from_velocity(velocity, x, TIMES), noise, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(path.velocity_from_score(score, x, TIMES), velocity, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(PATHS))
def test_interpolate_gives_the_point_and_its_time_derivative(name):
    path = PATHS[name]()
    x0, x1 = torch.randn(2, len(TIMES), 4, 2, 2, dtype=torch.float64)
    t, xt, ut = path.interpolate(TIMES, x0, x1)
    point = lambda tt: path.point(tt, x0, x1)  # noqa: E731
    alpha, sigma = CLOSED[name]
    torch.testing.assert_close(xt, alpha(TIMES).view(-1, 1, 1, 1) * x1 + sigma(TIMES).view(-1, 1, 1, 1) * x0)
    torch.testing.assert_close(ut, derivative(point, TIMES), rtol=1e-6, atol=1e-7)
    assert t is TIMES


@pytest.mark.parametrize("name", list(PATHS))
def test_diffusion_forms(name):
    path, (alpha, sigma) = PATHS[name](), CLOSED[name]
    x, norm = torch.zeros(len(TIMES), 1, 1, 1, dtype=torch.float64), 0.7
    t = TIMES.view(-1, 1, 1, 1)
    rate = (derivative(alpha, TIMES) / alpha(TIMES)).view(-1, 1, 1, 1)
    s, ds = sigma(TIMES).view(-1, 1, 1, 1), derivative(sigma, TIMES).view(-1, 1, 1, 1)
    expected = {"constant": torch.full_like(t, norm), "SBDM": norm * (rate * s ** 2 - s * ds),
                "sigma": norm * s, "linear": norm * (1 - t),
                "decreasing": 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2,
                "increasing-decreasing": norm * torch.sin(math.pi * t) ** 2}
    for form, value in expected.items():
        torch.testing.assert_close(path.diffusion_coefficient(x, TIMES, form=form, norm=norm), value,
                                   rtol=1e-6, atol=1e-9, msg=form)
    # SiT's flag value carries a typo; it must keep selecting the same form.
    torch.testing.assert_close(path.diffusion_coefficient(x, TIMES, "inccreasing-decreasing", norm),
                               expected["increasing-decreasing"])
    with pytest.raises(NotImplementedError, match="diffusion form"):
        path.diffusion_coefficient(x, TIMES, form="cosine")


def test_sit_names_answer_on_every_path():
    x0, x1 = torch.randn(2, 3, 2, 2, 2)
    t = torch.rand(3)
    for path in (ICPlan(), GVPPath(), VPCPlan()):
        assert path.compute_alpha_t(t)[0] is not None
        torch.testing.assert_close(path.compute_sigma_t(t)[0], path.sigma(t)[0])   # dispatches per subclass
        torch.testing.assert_close(path.plan(t, x0, x1)[1], path.compute_xt(t, x0, x1))
        torch.testing.assert_close(path.compute_ut(t, x0, x1, None), path.path_velocity(t, x0, x1))
        torch.testing.assert_close(path.compute_drift(x1, t)[0], path.score_drift(x1, t)[0])
        with pytest.raises(AttributeError):
            path.compute_nothing
    assert create_transport("GVP").path_sampler.compute_alpha_t(torch.ones(1))[0].item() == pytest.approx(1.0)
