"""--cfg-interval (guidance only at model times in [LOW, HIGH]) on every sampler, checked step by step
with a recording model: inside the interval one guided forward of the model batch 2N, outside ONE
forward of the conditional half (batch N), never two; each model input before the interval is entered
equals the never-guided run's, each input until it is left equals the always-guided run's, and the
first input after a change of regime differs (the interval changes the samples only where it says).
Coordinates: diffusion, the 1000-step chain's timestep (what the model sees); flow, SiT's t."""
import pytest
import torch

from dit_fast.diffusion import create_diffusion
from dit_fast.sampling import build_sampler
from dit_fast.transport import create_transport
from tests.sampling_helpers import build_tiny

N, C, S = 2, 4, 8
NEVER = (-2.0, -1.0)  # an interval no model time falls in


def _sde(**kw):
    return dict(sampling_method="Euler", num_steps=6, diffusion_form="sigma", **kw)


# name, process, method, options, (interval sampled first, interval sampled last), everything
CASES = [
    ("ddpm", lambda: create_diffusion("8"), "ddpm", {}, ((450, 999), (0, 450)), (0, 999)),
    ("ddim", lambda: create_diffusion("8"), "ddim", {}, ((450, 999), (0, 450)), (0, 999)),
    ("dpm-solver++", lambda: create_diffusion("6"), "dpm-solver++", {}, ((450, 999), (0, 450)), (0, 999)),
    ("flow ODE", create_transport, "ode", dict(sampling_method="euler", num_steps=7),
     ((0, 0.45), (0.45, 1)), (0, 1)),
    ("flow SDE", create_transport, "sde", _sde(), ((0, 0.45), (0.45, 1)), (0, 1)),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_tiny(input_size=S, in_channels=C, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # adaLN-zero starts at zero output
    return m.eval()


class Recorder:
    """Wraps model.forward: every forward's batch size, model time and conditional-half input."""

    def __init__(self, model):
        self.model, self.calls, self.inner = model, [], model.forward

    def __enter__(self):
        def forward(x, t, y, **kw):
            self.calls.append((x.shape[0], float(t[0]), x[:N].clone()))
            return self.inner(x, t, y, **kw)
        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def run(model, case, interval, use_cfg=True):
    _, make, method, options, _, _ = case
    sampler = build_sampler(model, make(), method=method, cfg_scale=4.0, num_classes=10, use_cfg=use_cfg,
                            cfg_interval=interval, **options)
    z = torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)  # the same step noise (ddpm, SDE) in every run
    with Recorder(model) as rec:
        out = sampler.sample(z, torch.tensor([3, 7]))
    return out, rec.calls


def inside(t, interval):
    return interval[0] <= t <= interval[1]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_guidance_only_inside_the_interval_step_by_step(model, case):
    if case[2] == "dpm-solver++":
        pytest.importorskip("diffusers")
    first, last = case[4]
    guided, g_calls = run(model, case, None)
    never, u_calls = run(model, case, NEVER)
    assert all(b == 2 * N for b, _, _ in g_calls) and all(b == N for b, _, _ in u_calls)
    for interval in (first, last):
        _, calls = run(model, case, interval)
        assert len(calls) == len(g_calls)  # one forward per model evaluation, never two
        times = [t for _, t, _ in calls]
        assert times == [t for _, t, _ in g_calls]
        assert [b for b, _, _ in calls] == [2 * N if inside(t, interval) else N for t in times]
        flags = [inside(t, interval) for t in times]
        assert any(flags) and not all(flags), (interval, times)
        switch = flags.index(not flags[0])  # the first model call of the other regime
        same_as = g_calls if flags[0] else u_calls  # the run these calls follow until the switch
        for k in range(switch + 1):  # the state the switching call sees was made by the old regime
            assert torch.equal(calls[k][2], same_as[k][2]), k
        assert not torch.equal(calls[switch + 1][2], same_as[switch + 1][2])  # ... and then it changes


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_whole_interval_is_guidance_and_empty_one_is_the_unguided_model(model, case):
    if case[2] == "dpm-solver++":
        pytest.importorskip("diffusers")
    guided, _ = run(model, case, None)
    assert torch.equal(run(model, case, case[5])[0], guided)
    never, _ = run(model, case, NEVER)
    assert not torch.equal(never, guided)
    if case[2] not in ("ddpm", "sde"):  # deterministic: the same numbers as sampling without guidance
        assert torch.equal(never, run(model, case, None, use_cfg=False)[0])


def test_adaptive_dopri5_guides_exactly_the_calls_inside_the_interval(model):
    """torchdiffeq's dopri5 picks its own times (other ones once the field changes), so the check is
    per call: batch 2N at every model time inside the interval, N outside; the whole interval is the
    guided solve and an empty one the unguided model's, bit for bit. Its last step overshoots t = 1
    and interpolates back: those calls count as t = 1 (guided when the interval reaches 1)."""
    pytest.importorskip("torchdiffeq")
    case = ("dopri5", create_transport, "ode", dict(sampling_method="dopri5", atol=1e-4, rtol=1e-4), None, (0, 1))
    guided, g_calls = run(model, case, None)
    assert len(g_calls) > 10 and all(b == 2 * N for b, _, _ in g_calls)
    assert any(t > 1 for _, t, _ in g_calls)  # the overshoot this test is about
    for interval in ((0, 0.45), (0.45, 1)):
        _, calls = run(model, case, interval)
        flags = [inside(min(t, 1.0), interval) for _, t, _ in calls]
        assert any(flags) and not all(flags), interval
        assert [b for b, _, _ in calls] == [2 * N if f else N for f in flags]
    assert torch.equal(run(model, case, case[5])[0], guided)
    assert torch.equal(run(model, case, NEVER)[0], run(model, case, None, use_cfg=False)[0])
