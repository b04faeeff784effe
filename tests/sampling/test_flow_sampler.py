"""SiT's flow samplers behind build_sampler (methods "ode" / "sde"): the same numbers as calling
dit_fast.transport's Sampler directly on drop_learned_sigma(forward_with_cfg) with SiT's doubled batch
(what SiT's sample.py does), eager and compiled; unguided = forward on z alone."""
import pytest
import torch

from dit_fast.sampling import build_sampler
from dit_fast.sampling.flow import call_times
from dit_fast.transport import Sampler as TransportSampler
from dit_fast.transport import create_transport, drop_learned_sigma
from tests.sampling_helpers import save_tiny_checkpoint, build_tiny

N, C, S = 3, 4, 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("flow") / "m.pt", input_size=S, in_channels=C)
    m = build_tiny(input_size=S, in_channels=C, num_classes=10)
    m.load_state_dict(torch.load(path, weights_only=True))
    return m.eval()


def direct(model, transport, mode, z, y, cfg_scale, **options):
    """SiT's sample.py: z doubled, labels [y, null], forward_with_cfg, the first half of the last state."""
    sampler = TransportSampler(transport)
    fn = sampler.sample_ode(**options) if mode == "ODE" else sampler.sample_sde(**options)
    zz, yy = torch.cat([z, z]), torch.cat([y, torch.full_like(y, 10)])
    out = fn(zz, drop_learned_sigma(model.forward_with_cfg), y=yy, cfg_scale=cfg_scale)[-1]
    return out.chunk(2)[0]


CASES = [
    ("ode", dict(sampling_method="euler", num_steps=6)),
    ("ode", dict(sampling_method="heun", num_steps=5)),
    ("ode", dict(sampling_method="dopri5", num_steps=4, atol=1e-4, rtol=1e-3)),
    ("sde", dict(sampling_method="Euler", num_steps=6, diffusion_form="sigma", last_step="Mean")),
    ("sde", dict(sampling_method="Heun", num_steps=5, diffusion_form="sigma", last_step="Tweedie")),
]


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("path_type,prediction", [("Linear", "velocity"), ("GVP", "noise")])
def test_same_numbers_as_the_transport_sampler_called_directly(model, method, options, path_type, prediction):
    if options["sampling_method"] == "dopri5":
        pytest.importorskip("torchdiffeq")
    transport = create_transport(path_type, prediction)
    z, y = torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 5, 9])
    torch.manual_seed(7)
    expect = direct(model, transport, method.upper(), z, y, 4.0, **options)
    sampler = build_sampler(model, transport, method=method, cfg_scale=4.0, num_classes=10, **options)
    torch.manual_seed(7)
    got = sampler.sample(z, y)
    assert torch.isfinite(got).all()
    assert torch.equal(got, expect)


def test_unguided_is_forward_on_z_alone(model):
    transport = create_transport()
    z, y = torch.randn(N, C, S, S), torch.tensor([0, 1, 2])
    fn = TransportSampler(transport).sample_ode(sampling_method="euler", num_steps=4)
    expect = fn(z, drop_learned_sigma(model.forward), y=y)[-1]
    got = build_sampler(model, transport, method="ode", use_cfg=False, num_classes=10,
                        sampling_method="euler", num_steps=4).sample(z, y)
    assert torch.equal(got, expect)


def test_call_times_are_the_model_times_of_each_loop():
    t = create_transport()
    ode = TransportSampler(t).sample_ode(sampling_method="heun", num_steps=3)
    assert call_times(ode) == [0.0, 0.5, 0.5, 1.0]           # heun: t and t + dt per step
    sde = TransportSampler(t).sample_sde(sampling_method="Euler", num_steps=3, diffusion_form="sigma",
                                         last_step_size=0.04)
    assert call_times(sde) == pytest.approx([0.0, 0.48, 0.96])   # two steps, then the last step at 1 - 0.04


def test_generator_seeds_the_sde_and_leaves_the_global_rng(model):
    s = build_sampler(model, create_transport(), method="sde", num_classes=10, sampling_method="Euler",
                      num_steps=4, diffusion_form="sigma")
    z, y = torch.randn(N, C, S, S), torch.tensor([0, 1, 2])
    state = torch.get_rng_state()
    a = s.sample(z, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, s.sample(z, y, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, s.sample(z, y, generator=torch.Generator().manual_seed(4)))


def test_compiled_equals_eager(model):
    transport = create_transport()
    z, y = torch.randn(N, C, S, S), torch.tensor([0, 1, 2])
    kw = dict(method="ode", num_classes=10, sampling_method="euler", num_steps=4, cfg_interval=(0.2, 0.6))
    eager = build_sampler(model, transport, **kw).sample(z, y)
    compiled = build_sampler(model, transport, **kw)
    compiled.compile(z.shape)
    torch.testing.assert_close(compiled.sample(z, y), eager, rtol=1e-5, atol=1e-5)


def test_bad_options_fail_before_sampling(model):
    transport = create_transport()
    with pytest.raises(NotImplementedError):
        build_sampler(model, transport, method="sde", num_classes=10, sampling_method="RK4")
    with pytest.raises(ValueError, match="flow samplers"):
        build_sampler(model, transport, method="ddpm", num_classes=10, sampling_method="euler")
