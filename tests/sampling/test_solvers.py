"""diffusers' solvers behind dit_fast.sampling.build_sampler (dit_fast.sampling.solvers): CPU, tiny model, few steps.

The reference is written here with the diffusers scheduler directly (set_timesteps,
scale_model_input, step), as diffusers' pipelines drive it, on the same model output."""
import sys

import numpy as np
import pytest
import torch

from dit_fast.diffusion import create_diffusion, get_named_beta_schedule
from dit_fast.sampling import SAMPLERS, build_sampler
from dit_fast.sampling.solvers import SOLVERS, build_scheduler, scheduler_config
from tests.conftest import requires_cuda
from tests.sampling_helpers import build_tiny

diffusers = pytest.importorskip("diffusers")
N, C, S = 2, 4, 8  # samples, latent channels, side


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_tiny(input_size=S, in_channels=C, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():  # adaLN-Zero starts at zero output: make the model do something
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def _reference_loop(model, name, steps, z, labels, use_cfg, guide_all_channels=False, cfg_scale=4.0):
    """diffusers' scheduler loop as its pipelines run it; returns every step's sample."""
    cls = getattr(diffusers, SOLVERS[name][0])
    betas = get_named_beta_schedule("linear", 1000)
    scheduler = cls(num_train_timesteps=1000, trained_betas=betas.tolist(), prediction_type="epsilon",
                    timestep_spacing="trailing", **SOLVERS[name][1])
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    y = torch.cat([labels, torch.full_like(labels, 10)]) if use_cfg else labels
    trajectory = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            t_batch = t[None].expand(len(y))  # the scheduler's own value and dtype, as DiTPipeline
            if use_cfg:
                out = model.forward_with_cfg(torch.cat([x_in, x_in]), t_batch, y, cfg_scale,
                                             guide_all_channels=guide_all_channels)[:N]
            else:
                out = model(x_in, t_batch, y)
            eps, _variance = out.split(C, dim=1)
            x = scheduler.step(eps, t, x).prev_sample
            trajectory.append(x)
    return trajectory


def _recording(monkeypatch, name):
    """Record every prev_sample the scheduler class returns (ours and the reference alike)."""
    cls = getattr(diffusers, SOLVERS[name][0])
    seen, step = [], cls.step

    def recorded(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        seen.append(out[0] if isinstance(out, tuple) else out.prev_sample)
        return out
    monkeypatch.setattr(cls, "step", recorded)
    return seen


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("use_cfg", [True, False], ids=["guided", "conditional"])
def test_solver_matches_the_diffusers_loop_step_for_step(model, name, use_cfg, monkeypatch):
    steps = 4
    z, labels = torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    ref = _reference_loop(model, name, steps, z, labels, use_cfg)
    seen = _recording(monkeypatch, name)
    sampler = build_sampler(model, create_diffusion(str(steps)), method=name, num_classes=10, use_cfg=use_cfg)
    out = sampler.sample(z, labels)
    assert len(seen) == len(ref) == sampler.num_model_evaluations
    for k, (ours, theirs) in enumerate(zip(seen, ref)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {k}: {m}")
    torch.testing.assert_close(out, ref[-1], rtol=1e-6, atol=1e-6)
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_guide_all_channels_reaches_the_model(model):
    z, labels = torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 9])
    ref = _reference_loop(model, "dpm-solver++", 3, z, labels, True, guide_all_channels=True)[-1]
    ours = build_sampler(model, create_diffusion("3"), method="dpm-solver++", num_classes=10,
                   guide_all_channels=True).sample(z, labels)
    three = build_sampler(model, create_diffusion("3"), method="dpm-solver++", num_classes=10).sample(z, labels)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours, three)


def test_compiled_solvers_match_eager(model):
    """The compiled model call (CFG forward + split) gives the eager samples; compile time is apart."""
    z, labels = torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 2])
    for name in SOLVERS:
        eager = build_sampler(model, create_diffusion("3"), method=name, num_classes=10).sample(z, labels)
        compiled = build_sampler(model, create_diffusion("3"), method=name, num_classes=10)
        assert compiled.compile(z.shape) > 0 and compiled.compile_seconds > 0
        # Inductor reorders float ops; 1e-3 as the existing compiled-vs-eager sampler tests.
        torch.testing.assert_close(compiled.sample(z, labels), eager, rtol=1e-3, atol=1e-3, msg=name)
    conditional = dict(method="unipc", num_classes=10, use_cfg=False)  # model.forward, no CFG batch
    eager = build_sampler(model, create_diffusion("3"), **conditional).sample(z, labels)
    compiled = build_sampler(model, create_diffusion("3"), **conditional)
    compiled.compile(z.shape)
    torch.testing.assert_close(compiled.sample(z, labels), eager, rtol=1e-3, atol=1e-3)


def test_model_sees_integer_training_timesteps(model):
    seen = []
    hook = model.t_embedder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        build_sampler(model, create_diffusion("3"), method="heun", num_classes=10).sample(
            torch.randn(N, C, S, S), torch.tensor([1, 2]))
    finally:
        hook.remove()
    assert [t.dtype for t in seen] == [torch.int64] * 5  # Heun: 2 * 3 - 1 evaluations
    assert [int(t[0]) for t in seen] == [999, 666, 666, 332, 332]
    assert all(bool((t == t[0]).all()) for t in seen)


def test_nfe_and_schedule_follow_the_diffusion():
    for name, nfe in (("dpm-solver++", 5), ("unipc", 5), ("euler", 5), ("heun", 9)):
        assert build_sampler(build_tiny(input_size=S, in_channels=C, num_classes=10), create_diffusion("5"),
                       method=name, num_classes=10).num_model_evaluations == nfe
    # A respaced diffusion keeps its base 1000-step betas, for any schedule (the solver's trained_betas).
    for schedule in ("linear", "squaredcos_cap_v2"):
        full = get_named_beta_schedule(schedule, 1000)
        assert np.array_equal(create_diffusion("7", noise_schedule=schedule).base_betas, full)
    from dit_fast.diffusion import LossType, ModelMeanType, ModelVarType, SpacedDiffusion
    odd = np.linspace(1e-3, 3e-2, 50) ** 1.5  # no named schedule: guessing could not recover it
    spaced = SpacedDiffusion([0, 10, 49], betas=odd, model_mean_type=ModelMeanType.EPSILON,
                             model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.MSE)
    assert scheduler_config("unipc", spaced)["trained_betas"] == odd.tolist()
    config = scheduler_config("dpm-solver++", create_diffusion("10", predict_xstart=True))
    assert config["prediction_type"] == "sample" and len(config["trained_betas"]) == 1000
    assert build_scheduler("euler", create_diffusion("10")).timesteps[0] == 999


def test_clear_errors(monkeypatch):
    assert set(SOLVERS) <= set(SAMPLERS) and {"ddpm", "ddim"} <= set(SAMPLERS)
    tiny = build_tiny(input_size=S, in_channels=C, num_classes=10)
    with pytest.raises(ValueError, match="dpm-solver\\+\\+.*unipc.*euler.*heun"):
        build_sampler(tiny, create_diffusion("2"), method="dpm-solver")
    with pytest.raises(ValueError, match="eta and clip_denoised .* not of euler"):
        build_sampler(tiny, create_diffusion("2"), method="euler", eta=0.5)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError, match="pip install diffusers"):
        build_sampler(tiny, create_diffusion("2"), method="unipc")


@requires_cuda
@pytest.mark.parametrize("name", ["dpm-solver++", "euler", "heun"])
def test_compiled_cuda_solver_adds_no_host_syncs(name):
    """CUDA graphs of the model call; the loop itself syncs nowhere (the schedulers keep their
    per-step scalars on the host). UniPC is left out: its corrector solves a small system on the
    device each step (diffusers' own cost)."""
    torch.manual_seed(0)
    model = build_tiny(input_size=S, in_channels=C, num_classes=10).cuda().eval()
    z, labels = torch.randn(N, C, S, S, device="cuda"), torch.tensor([1, 2], device="cuda")
    ref = build_sampler(model, create_diffusion("4"), method=name, num_classes=10).sample(z, labels)
    compiled = build_sampler(model, create_diffusion("4"), method=name, num_classes=10)
    compiled.compile(z.shape)
    compiled.sample(z, labels)  # finishes any CUDA-graph recording (which synchronises)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = compiled.sample(z, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
