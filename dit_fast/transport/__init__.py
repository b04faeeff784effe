"""SiT's flow-matching transport (Ma et al. 2024) with SiT's public interface:

    from dit_fast.transport import create_transport, Sampler
    transport = create_transport("Linear", "velocity")          # SiT's defaults
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    sample_fn = Sampler(transport).sample_ode(sampling_method="dopri5", num_steps=50)
    samples = sample_fn(z, model.forward_with_cfg, y=y, cfg_scale=4.0)[-1]

t = 0 is noise and t = 1 data (the reverse of DiT's diffusion timesteps). Adaptive ODE solvers need
torchdiffeq (extra "flow"); euler, midpoint and heun2 are ours and need nothing.
"""
from .model_output import drop_learned_sigma
from .paths import DIFFUSION_FORMS, GVPPath, LinearPath, VPPath, expand_t_like_x
from .sampler import LAST_STEPS, Sampler
from .transport import ModelType, PathType, Transport, WeightType, mean_flat

__all__ = ["create_transport", "Transport", "Sampler", "ModelType", "PathType", "WeightType",
           "LinearPath", "GVPPath", "VPPath", "DIFFUSION_FORMS", "LAST_STEPS", "drop_learned_sigma",
           "expand_t_like_x", "mean_flat", "PATH_TYPES", "PREDICTIONS", "LOSS_WEIGHTS"]

PATH_TYPES = {"Linear": PathType.LINEAR, "GVP": PathType.GVP, "VP": PathType.VP}
PREDICTIONS = {"velocity": ModelType.VELOCITY, "score": ModelType.SCORE, "noise": ModelType.NOISE}
LOSS_WEIGHTS = {None: WeightType.NONE, "velocity": WeightType.VELOCITY, "likelihood": WeightType.LIKELIHOOD}

# Default eps where a path/prediction pair is singular at an end (see Transport.check_interval).
_VP_TRAIN_EPS, _VP_SAMPLE_EPS, _SINGULAR_EPS = 1e-5, 1e-3, 1e-3


def _lookup(table, value, what):
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(repr(k) for k in table)}")
    return table[value]


def _eps_interval(path_type, model_type, train_eps, sample_eps):
    """SiT's eps rules. A velocity model on Linear/GVP is regular everywhere: both eps are 0, whatever
    was asked. Otherwise each defaults when train_eps is not given (SiT keys both defaults on
    train_eps); a sample_eps left None beside a given train_eps, which SiT would fail on when sampling,
    takes the default too."""
    if path_type != PathType.VP and model_type == ModelType.VELOCITY:
        return 0, 0
    train_default, sample_default = ((_VP_TRAIN_EPS, _VP_SAMPLE_EPS) if path_type == PathType.VP
                                     else (_SINGULAR_EPS, _SINGULAR_EPS))
    if train_eps is None:
        return train_default, sample_default
    return train_eps, sample_default if sample_eps is None else sample_eps


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None,
                     sample_eps=None) -> Transport:
    """A Transport from SiT's flag values.

    path_type: "Linear" (alpha_t = t, sigma_t = 1 - t), "GVP" (sin / cos) or "VP" (the VP-SDE's
    marginals). prediction: "velocity", "score" or "noise". loss_weight (score / noise models only):
    None, "velocity" or "likelihood". train_eps / sample_eps: how far the training / sampling times
    stay from a singular end; None takes SiT's defaults (VP: 1e-5 / 1e-3; score or noise on
    Linear/GVP: 1e-3 / 1e-3; velocity on Linear/GVP: always 0)."""
    path = _lookup(PATH_TYPES, path_type, "path_type")
    # SiT reads any unknown prediction as velocity and any unknown weight as none; a typo is an error here.
    model_type = _lookup(PREDICTIONS, prediction, "prediction")
    loss_type = _lookup(LOSS_WEIGHTS, loss_weight, "loss_weight")
    train_eps, sample_eps = _eps_interval(path, model_type, train_eps, sample_eps)
    return Transport(model_type=model_type, path_type=path, loss_type=loss_type, train_eps=train_eps,
                     sample_eps=sample_eps)
