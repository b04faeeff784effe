"""create_transport's eps rules, the order and stream of the training draws (noise, then t on the CPU
generator), and the losses at fixed t and noise, computed here from the equations."""
import pytest
import torch

from dit_fast.transport import ModelType, PathType, WeightType, create_transport, drop_learned_sigma
from transport_closed_forms import coefficients

# (path, prediction) -> (train_eps, sample_eps) with train_eps / sample_eps left None, as SiT sets them.
DEFAULT_EPS = {("Linear", "velocity"): (0, 0), ("GVP", "velocity"): (0, 0), ("VP", "velocity"): (1e-5, 1e-3),
               ("Linear", "score"): (1e-3, 1e-3), ("GVP", "noise"): (1e-3, 1e-3), ("VP", "noise"): (1e-5, 1e-3)}


@pytest.mark.parametrize("key", list(DEFAULT_EPS))
def test_default_eps(key):
    transport = create_transport(*key)
    assert (transport.train_eps, transport.sample_eps) == DEFAULT_EPS[key]


def test_given_eps_are_kept_except_where_velocity_needs_none():
    vp = create_transport("VP", "velocity", None, 0.01, 0.02)
    assert (vp.train_eps, vp.sample_eps) == (0.01, 0.02)
    assert create_transport("Linear", "noise", None, 0.01, 0.02).sample_eps == 0.02
    # A velocity model on Linear / GVP is regular on [0, 1]: SiT ignores the eps given.
    assert create_transport("GVP", "velocity", None, 0.01, 0.02).train_eps == 0
    # SiT leaves sample_eps None here (and fails when sampling); the default is taken instead.
    assert create_transport("VP", "velocity", None, 0.01, None).sample_eps == 1e-3


def test_names_map_to_sit_enums_and_typos_are_errors():
    transport = create_transport("GVP", "score", "likelihood")
    assert (transport.path_type, transport.model_type, transport.loss_type) == \
        (PathType.GVP, ModelType.SCORE, WeightType.LIKELIHOOD)
    assert [m.value for m in ModelType] == [1, 2, 3] and ModelType.VELOCITY.name == "VELOCITY"
    for bad in (dict(path_type="linear"), dict(prediction="eps"), dict(loss_weight="snr")):
        with pytest.raises(ValueError, match="unknown"):
            create_transport(**bad)


INTERVALS = [  # (path, prediction, check_interval kwargs) -> (t0, t1)
    ("Linear", "velocity", dict(), (0, 1)),
    ("Linear", "velocity", dict(eval=True, reverse=True), (1, 0)),
    ("Linear", "velocity", dict(eval=True, sde=True, diffusion_form="sigma", last_step_size=0.04), (0, 0.96)),
    ("Linear", "velocity", dict(eval=True, sde=True, diffusion_form="SBDM", last_step_size=0.04), (0, 0.96)),
    ("Linear", "noise", dict(), (1e-3, 1 - 1e-3)),
    ("GVP", "score", dict(eval=True, sde=True, diffusion_form="sigma", last_step_size=0.0), (1e-3, 1 - 1e-3)),
    ("VP", "velocity", dict(), (0, 1 - 1e-5)),
    ("VP", "velocity", dict(eval=True), (0, 1 - 1e-3)),
    ("VP", "score", dict(eval=True, sde=True, last_step_size=0.04), (0, 0.96)),
    ("VP", "noise", dict(eval=True, reverse=True), (1, 1e-3)),
]


@pytest.mark.parametrize("path, prediction, kwargs, expected", INTERVALS)
def test_check_interval(path, prediction, kwargs, expected):
    transport = create_transport(path, prediction)
    got = transport.check_interval(transport.train_eps, transport.sample_eps, **kwargs)
    assert got == pytest.approx(expected, abs=1e-12)


def expected_loss(path, prediction, weighting, t, x0, x1, model):
    a, da, s, ds = (c.view(-1, 1, 1, 1) for c in coefficients(path, t.double()))
    xt = a * x1.double() + s * x0.double()
    out = model(xt.float(), t).double()
    if prediction == "velocity":
        return ((out - (da * x1 + ds * x0)) ** 2).mean(dim=(1, 2, 3))
    drift_var = da / a * s ** 2 - s * ds
    weight = {None: 1, "velocity": (drift_var / s) ** 2, "likelihood": drift_var / s ** 2}[weighting]
    target = out - x0 if prediction == "noise" else out * s + x0
    return (weight * target ** 2).mean(dim=(1, 2, 3))


def toy_model(x, t, y=None):
    shift = 0 if y is None else y.view(-1, 1, 1, 1)
    return torch.sin(3 * x) * t.view(-1, 1, 1, 1) + 0.1 * shift


CASES = [(p, pred, w) for p in ("Linear", "GVP", "VP") for pred in ("velocity", "score", "noise")
         for w in ((None,) if pred == "velocity" else (None, "velocity", "likelihood"))]


@pytest.mark.parametrize("path, prediction, weighting", CASES)
def test_seeded_loss_draws_noise_then_t(path, prediction, weighting):
    transport = create_transport(path, prediction, weighting)
    x1, y = torch.randn(6, 2, 3, 3), torch.arange(6.0)
    torch.manual_seed(123)
    terms = transport.training_losses(toy_model, x1, dict(y=y))
    torch.manual_seed(123)   # the hand computation: noise like x1 first, then t ~ U[t0, t1) from torch.rand
    x0 = torch.randn_like(x1)
    t0, t1 = {"VP": (0, 1 - 1e-5)}.get(path, (0, 1) if prediction == "velocity" else (1e-3, 1 - 1e-3))
    t = torch.rand(6) * (t1 - t0) + t0
    model = lambda xt, tt: toy_model(xt, tt, y)  # noqa: E731
    want = expected_loss(path, prediction, weighting, t, x0, x1, model)
    assert terms["loss"].shape == (6,) and terms["pred"].shape == x1.shape
    torch.testing.assert_close(terms["loss"].double(), want, rtol=2e-4, atol=1e-6)


def test_loss_at_fixed_t_and_noise(monkeypatch):
    """Linear velocity with a fixed t and noise: the loss is |model - (x1 - x0)|^2 averaged."""
    transport = create_transport()
    x1 = torch.randn(3, 4, 2, 2)
    x0 = torch.randn_like(x1)
    t = torch.tensor([0.0, 0.25, 1.0])
    monkeypatch.setattr(transport, "sample", lambda data: (t, x0, data))
    seen = {}

    def model(xt, tt):
        seen["xt"], seen["t"] = xt, tt
        return torch.zeros_like(xt)
    loss = transport.training_losses(model, x1)["loss"]
    torch.testing.assert_close(seen["xt"], t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0)
    torch.testing.assert_close(loss, ((x1 - x0) ** 2).mean(dim=(1, 2, 3)))


def test_t_is_drawn_on_the_cpu_generator_and_moved_to_the_data():
    transport = create_transport()
    x1 = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    torch.manual_seed(7)
    t, x0, data = transport.sample(x1)
    torch.manual_seed(7)
    torch.randn_like(x1)
    assert t.dtype == torch.float64 and torch.equal(t, torch.rand(5).double()) and data is x1


def test_learned_sigma_output_is_refused_until_wrapped():
    transport = create_transport()
    x1 = torch.randn(2, 4, 2, 2)
    doubled = lambda x, t: torch.cat([x, -x], dim=1)  # noqa: E731
    with pytest.raises(ValueError, match="drop_learned_sigma"):
        transport.training_losses(doubled, x1)
    loss = transport.training_losses(drop_learned_sigma(doubled), x1)["loss"]
    assert loss.shape == (2,) and torch.isfinite(loss).all()
