"""ADM Gaussian diffusion as DiT uses it: `create_diffusion` with DiT's signature and defaults.

    from dit_fast.diffusion import create_diffusion
    diffusion = create_diffusion(timestep_respacing="")      # training: all 1000 steps
    sampler = create_diffusion("250")                         # sampling: 250 respaced steps
"""
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .losses import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .respace import SpacedDiffusion, space_timesteps
from .schedules import betas_for_alpha_bar, get_beta_schedule, get_named_beta_schedule

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "get_named_beta_schedule",
    "get_beta_schedule",
    "betas_for_alpha_bar",
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "continuous_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """Build the (respaced) diffusion exactly as DiT's create_diffusion does.

    timestep_respacing: "" or None for all `diffusion_steps`, else a spec for space_timesteps
    ("250", "ddim50", "10,20,30" or a list of ints). noise_schedule: "linear" or
    "squaredcos_cap_v2". use_kl -> RESCALED_KL loss; rescale_learned_sigmas -> RESCALED_MSE; else
    MSE (+ vb when learn_sigma). predict_xstart: the model predicts x_0 instead of eps.
    learn_sigma: the model outputs 2C channels (LEARNED_RANGE variance); otherwise the variance is
    fixed large (beta_t) or, with sigma_small, the posterior variance.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = ModelVarType.LEARNED_RANGE
    else:
        model_var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )
