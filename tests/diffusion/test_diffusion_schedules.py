"""Schedules and float64 tables against values computed by hand."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from dit_fast.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, create_diffusion
from dit_fast.diffusion.schedules import at, get_named_beta_schedule


def _plain(betas, var=ModelVarType.FIXED_SMALL):
    return GaussianDiffusion(betas=betas, model_mean_type=ModelMeanType.EPSILON,
                             model_var_type=var, loss_type=LossType.MSE)


@pytest.mark.parametrize("T", [1000, 250, 40])
def test_linear_endpoints_scale_with_steps(T):
    betas = get_named_beta_schedule("linear", T)
    scale = 1000 / T
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4 * scale, rel=1e-15)
    assert betas[-1] == pytest.approx(0.02 * scale, rel=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) * scale / (T - 1), rtol=1e-9)


def test_cosine_matches_formula_and_cap():
    T = 100
    betas = get_named_beta_schedule("squaredcos_cap_v2", T)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    for i in [0, 1, 50, 98]:
        assert betas[i] == pytest.approx(1 - f((i + 1) / T) / f(i / T), rel=1e-14)
    assert betas[-1] == 0.999  # alpha_bar(1) = 0: capped
    assert betas.dtype == np.float64


def test_alphas_cumprod_and_posterior_by_hand():
    d = _plain([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(d.alphas_cumprod, [0.9, 0.72, 0.504, 0.3024], rtol=1e-14)
    np.testing.assert_allclose(d.alphas_cumprod_prev, [1.0, 0.9, 0.72, 0.504], rtol=1e-14)
    # beta_t (1 - abar_{t-1}) / (1 - abar_t)
    np.testing.assert_allclose(d.posterior_variance, [0.0, 0.2 * 0.1 / 0.28, 0.3 * 0.28 / 0.496,
                                                      0.4 * 0.496 / 0.6976], rtol=1e-13)
    # log variance at t = 0 is clipped to the t = 1 value
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_respaced_betas_are_float64_exact():
    d = create_diffusion("250")
    base = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1.0 - base)[d.timestep_map]
    expected = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_array_equal(d.betas, expected)
    # The float32 path the requirement rules out really is visibly different.
    abar32 = np.cumprod(1.0 - base.astype(np.float32))[d.timestep_map]
    betas32 = 1.0 - abar32 / np.concatenate([[np.float32(1.0)], abar32[:-1]])
    assert np.max(np.abs(betas32 - expected) / expected) > 1e-5


def test_device_schedule_float64_and_lookup_semantics():
    d = create_diffusion("")
    schedule = d.schedule_on(torch.device("cpu"))
    tables = {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule)}
    assert all(v.dtype == torch.float64 for k, v in tables.items() if k != "model_timesteps")
    assert d.schedule_on(torch.device("cpu")) is schedule  # built once per device
    t = torch.tensor([0, 500, 999])
    x = torch.zeros(3, 2, 4, 4)
    out = at(schedule.sqrt_recipm1_alphas_cumprod, t, x)   # float64 lookup, one rounding to float32
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    expected = torch.from_numpy(d.sqrt_recipm1_alphas_cumprod[[0, 500, 999]]).float()
    assert torch.equal(out.flatten(), expected)


def test_unknown_schedule_and_bad_steps_raise():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        create_diffusion("", noise_schedule="cosine")
    with pytest.raises(ValueError, match="at least 20"):
        create_diffusion("", diffusion_steps=10)
    with pytest.raises(ValueError, match="positive int"):
        create_diffusion("", diffusion_steps=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        _plain([0.1, 1.5])
    with pytest.raises(ValueError, match="PREVIOUS_X"):
        GaussianDiffusion(betas=[0.1], model_mean_type=ModelMeanType.PREVIOUS_X,
                          model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)


def test_create_diffusion_flags_map_like_dit():
    d = create_diffusion("")
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.MSE)
    assert d.num_timesteps == 1000 and d.timestep_map == list(range(1000))
    assert create_diffusion("", use_kl=True).loss_type == LossType.RESCALED_KL
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    assert create_diffusion("", learn_sigma=False).model_var_type == ModelVarType.FIXED_LARGE
    assert create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    assert create_diffusion(None, predict_xstart=True).model_mean_type == ModelMeanType.START_X
