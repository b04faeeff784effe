"""Gaussian diffusion for DiT: ``create_diffusion`` with DiT's signature and defaults.

    from dit_fast.diffusion import create_diffusion
    train_diffusion = create_diffusion(timestep_respacing="")   # every one of the 1000 steps
    sampler = create_diffusion("250")                           # 250 respaced steps
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
from .schedules import Schedule, betas_for_alpha_bar, get_beta_schedule, get_named_beta_schedule

__all__ = ["create_diffusion", "GaussianDiffusion", "SpacedDiffusion", "Schedule", "space_timesteps",
           "LossType", "ModelMeanType", "ModelVarType",
           "get_named_beta_schedule", "get_beta_schedule", "betas_for_alpha_bar",
           "mean_flat", "normal_kl", "approx_standard_normal_cdf", "continuous_gaussian_log_likelihood",
           "discretized_gaussian_log_likelihood"]


def _loss_type(use_kl: bool, rescale_learned_sigmas: bool) -> LossType:
    # use_kl wins over rescale_learned_sigmas, as in DiT.
    mse = LossType.RESCALED_MSE if rescale_learned_sigmas else LossType.MSE
    return LossType.RESCALED_KL if use_kl else mse


def _var_type(learn_sigma: bool, sigma_small: bool) -> ModelVarType:
    if learn_sigma:
        return ModelVarType.LEARNED_RANGE
    return ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=1000) -> SpacedDiffusion:
    """The (respaced) diffusion DiT trains and samples with.

    timestep_respacing: "" or None for all ``diffusion_steps``, else a space_timesteps spec ("250",
    "ddim50", "10,20,30" or a list of ints). noise_schedule: "linear" or "squaredcos_cap_v2".
    Loss: the bound rescaled to T steps with ``use_kl``; MSE plus the bound scaled by T / 1000 with
    ``rescale_learned_sigmas``; else MSE (plus the bound when the variance is learned). predict_xstart:
    the model predicts x_0 rather than eps. learn_sigma: the model outputs 2C channels (learned-range
    variance); otherwise the variance is fixed at beta_t, or at the posterior's with ``sigma_small``.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)   # validates diffusion_steps first
    spec = timestep_respacing if timestep_respacing not in (None, "") else [diffusion_steps]
    mean_type = ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON
    return SpacedDiffusion(space_timesteps(diffusion_steps, spec), betas=betas, model_mean_type=mean_type,
                           model_var_type=_var_type(learn_sigma, sigma_small),
                           loss_type=_loss_type(use_kl, rescale_learned_sigmas))
