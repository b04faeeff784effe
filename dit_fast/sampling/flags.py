"""What sample.py and sample_ddp.py share around the sampler: their common flags, the model they
sample (from the run's saved config, or from the flags), the checks of those flags, the model build,
the device and TF32 choice, and the error handling of the entry point.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, Optional

import torch

from dit_fast.config import (MODEL_FLAG_DEFAULTS, PRECISIONS, DiffusionConfig, TransportConfig, add_model_flags,
                             add_transport_flags, model_config_from_args, transport_checks)
from dit_fast.vae import is_pixel_space, model_channels, vae_downsample

from .build import SAMPLERS
from .config import SampleConfig
from .run_source import CkptSource, resolve_ckpt


def sample_size(image_size: int, downsample: int, patch_size: int) -> int:
    """Side of the model's input: image_size // downsample (image_size // 8 with the SD VAEs, as the
    original; image_size itself in pixel space). ValueError when the size does not divide."""
    if image_size < 1:
        raise ValueError(f"--image-size must be positive, got {image_size}")
    factor = downsample * patch_size
    if image_size % factor:
        where = (f"the patch size {patch_size} (pixel space, --vae none)" if downsample == 1
                 else f"the VAE's downsampling {downsample} x the patch size {patch_size}")
        raise ValueError(f"--image-size {image_size} must be divisible by {factor}: {where}; e.g. 256 or 512")
    return image_size // downsample


def check_official_defaults(model: str, image_size: int, num_classes: int, vae_spec: str) -> None:
    """Without --ckpt the official DiT-XL/2 checkpoint is used: the other flags must fit it."""
    problems = []
    if model != "DiT-XL/2":
        problems.append(f"--model {model} (official checkpoints are DiT-XL/2)")
    if image_size not in (256, 512):
        problems.append(f"--image-size {image_size} (official sizes are 256 and 512)")
    if num_classes != 1000:
        problems.append(f"--num-classes {num_classes} (official models have 1000)")
    if is_pixel_space(vae_spec):
        problems.append("--vae none (official models are latent-space models)")
    if problems:
        raise ValueError("without --ckpt the official DiT-XL/2 checkpoint is loaded, which does not fit "
                         + "; ".join(problems) + ". Pass --ckpt PATH to your own checkpoint.")


def check_class_labels(labels, num_classes: int) -> None:
    """Labels must be real classes: num_classes itself is the null (CFG) label."""
    bad = [c for c in labels if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"class labels {bad} are outside [0, {num_classes - 1}] (--num-classes "
                         f"{num_classes}; label {num_classes} is reserved for guidance)")
    if not labels:
        raise ValueError("give at least one class label")


def add_common_flags(parser, *, cfg_default: float, vae_default: str) -> None:
    """Flags sample.py and sample_ddp.py share (original names and defaults first). The model flags
    default to None: with --ckpt naming one of our runs they come from its saved config."""
    add_model_flags(parser, defaults=False)
    parser.add_argument("--vae", type=str, default=None,
                        help=f"ema | mse | a local diffusers dir | none (default {vae_default}, or the run's)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help=f"guidance scale (default {cfg_default}; a REPA model: REPA's {REPA_CFG_SCALE})")
    parser.add_argument("--num-sampling-steps", type=int, default=250,
                        help="respaced steps (ddpm/ddim) or solver steps (the diffusers solvers)")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="a train.py run dir (its newest checkpoint: model, size, classes, VAE and "
                             "diffusion come from its saved config), a checkpoints/step-NNNNNNN dir or "
                             "the EMA file in one, a checkpoint file, a diffusers DiT transformer "
                             "folder, or an official name (default: the official DiT-XL/2 for --image-size)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="diffusion models: ddpm (the original's, default), ddim, or diffusers' solvers: "
                             "dpm-solver++ (2M), unipc, euler, heun (2 model calls per step but the last)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="guide only at model times in [LOW, HIGH], one unguided forward elsewhere; "
                             "diffusion: the 1000-step training chain's timestep (0 = data, 999 = noise, "
                             "whatever --num-sampling-steps), flow: SiT's t (0 = noise, 1 = data), repa: "
                             f"REPA's t (0 = data, 1 = noise; default {REPA_CFG_INTERVAL})")
    add_flow_sampling_flags(parser)
    parser.add_argument("--in-channels", type=int, default=None, help="image channels with --vae none (3)")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="guide every channel (default: the first three, as the original)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the per-step function")
    parser.add_argument("--compile-mode", default=None,
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help='torch.compile mode (default: "reduce-overhead" on CUDA, "default" on CPU)')
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="autocast dtype of the model call; the diffusion math stays fp32")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on CUDA (on by default, as the original)")
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    parser.set_defaults(vae_default=vae_default, cfg_default=cfg_default)


# SiT's sampling flags (flow models only) and their defaults (SiT's sample.py: --diffusion-form sigma).
FLOW_SAMPLING_DEFAULTS = {"mode": "ODE", "sampling_method": None, "atol": 1e-6, "rtol": 1e-3, "reverse": False,
                          "diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "Mean",
                          "last_step_size": 0.04}


# REPA's best published setting (its README: --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7).
REPA_CFG_SCALE, REPA_CFG_INTERVAL = 1.8, (0.0, 0.7)


def _last_step(text: str):
    return None if text == "None" else text


def add_flow_sampling_flags(parser) -> None:
    """--objective / SiT's transport flags (for plain weight files) and SiT's sampler flags."""
    add_transport_flags(parser)
    a = parser.add_argument
    a("--mode", type=str.upper, choices=("ODE", "SDE"), default=None, help="flow: ODE (default) or SDE")
    a("--sampling-method", type=str, default=None,
      help="flow ODE: euler | heun | midpoint (ours) | dopri5 (default) ... (torchdiffeq); SDE: Euler "
           "(default) | Heun")
    a("--atol", type=float, default=None, help="flow ODE: adaptive solver's absolute tolerance (1e-6)")
    a("--rtol", type=float, default=None, help="flow ODE: adaptive solver's relative tolerance (1e-3)")
    a("--reverse", action="store_true", default=None, help="flow ODE: integrate from data to noise")
    a("--diffusion-form", type=str, default=None,
      help="flow SDE: w_t = constant | SBDM | sigma (default, SiT's sample.py) | linear | decreasing | "
           "increasing-decreasing")
    a("--diffusion-norm", type=float, default=None, help="flow SDE: w_t's scale (1.0)")
    a("--last-step", type=_last_step, choices=("Mean", "Tweedie", "Euler", None), default="unset",
      help="flow SDE: the final step (Mean, default) or None")
    a("--last-step-size", type=float, default=None, help="flow SDE: its size (0.04)")


def _flow_sampling_values(args, objective: str) -> dict:
    """SiT's sampler flags resolved to their defaults; any of them given for a diffusion model is an error."""
    given = {k: getattr(args, k) for k in FLOW_SAMPLING_DEFAULTS
             if getattr(args, k, None) is not None and getattr(args, k) != "unset"}
    if getattr(args, "last_step", "unset") is None:
        given["last_step"] = None
    if objective == "repa":
        return _repa_sampling_values(args, given)
    if objective != "flow":
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{flags}: SiT's sampler flags apply to flow models (--objective flow, or a "
                             "flow run's --ckpt); this model is a diffusion model")
        return dict(FLOW_SAMPLING_DEFAULTS)
    if args.sampler is not None:
        raise ValueError(f"--sampler {args.sampler} is a diffusion sampler; a flow model takes --mode ODE|SDE "
                         "and --sampling-method")
    values = {**FLOW_SAMPLING_DEFAULTS, **given}
    _check_flow_options(values)
    return {**values, "sampler": values["mode"].lower()}  # what messages and the folder settings show


def _repa_sampling_values(args, given: dict) -> dict:
    """REPA's samplers: --mode SDE (default, Euler-Maruyama) | ODE, --sampling-method euler | heun (ODE)."""
    other = [k for k in given if k not in ("mode", "sampling_method")]
    if other:
        flags = ", ".join("--" + k.replace("_", "-") for k in other)
        raise ValueError(f"{flags}: SiT's sampler flags do not apply to a REPA model (it takes --mode SDE|ODE "
                         "and, for the ODE, --sampling-method euler|heun)")
    if args.sampler is not None:
        raise ValueError(f"--sampler {args.sampler} is a diffusion sampler; a REPA model takes --mode SDE|ODE")
    mode = given.get("mode", "SDE")
    method = given.get("sampling_method")
    if method is not None and (mode != "ODE" or method.lower() not in ("euler", "heun")):
        raise ValueError(f"--sampling-method {method}: REPA's ODE sampler takes euler or heun (with --mode ODE); "
                         "its SDE sampler is Euler-Maruyama only")
    return {**FLOW_SAMPLING_DEFAULTS, "mode": mode, "sampling_method": method,
            "heun": (method or "").lower() == "heun", "sampler": f"repa-{mode.lower()}"}


def _check_flow_options(v: dict) -> None:
    """SiT's sampler flags that can never work fail here (ValueError), not inside the first step."""
    from dit_fast.transport import DIFFUSION_FORMS
    from dit_fast.transport.integrators import FIXED_STEP_METHODS, SDE_METHODS, canonical_ode_method
    method = v["sampling_method"]
    if v["mode"] == "SDE" and method is not None and method.lower() not in ("euler", "heun"):
        raise ValueError(f"--sampling-method {method} is not an SDE method; choose one of {', '.join(SDE_METHODS)}")
    if v["mode"] == "ODE" and method is not None and canonical_ode_method(method) not in FIXED_STEP_METHODS:
        try:
            from torchdiffeq._impl.odeint import SOLVERS
        except ImportError:
            SOLVERS = None  # the transport names the package to install when sampling starts
        if SOLVERS is not None and canonical_ode_method(method) not in SOLVERS:
            raise ValueError(f"--sampling-method {method} is not an ODE solver; choose one of "
                             f"{', '.join(sorted(set(FIXED_STEP_METHODS) | set(SOLVERS)))} (or heun)")
    if v["diffusion_form"] not in DIFFUSION_FORMS + ("inccreasing-decreasing",):
        raise ValueError(f"--diffusion-form must be one of {', '.join(DIFFUSION_FORMS)}, got {v['diffusion_form']!r}")
    if not (v["atol"] > 0 and v["rtol"] > 0 and v["diffusion_norm"] >= 0 and 0 <= v["last_step_size"] < 1):
        raise ValueError("need --atol > 0, --rtol > 0, --diffusion-norm >= 0 and 0 <= --last-step-size < 1")


# Flags that define the model: given beside a run, each must equal the run's saved value.
_MODEL_FLAGS = ("model", "image_size", "num_classes", "depth", "hidden_size", "num_heads")


def _from_saved_run(args, source: CkptSource) -> tuple:
    """(ModelConfig, DiffusionConfig, vae) of the run ``source`` was saved by; a model flag that
    contradicts it is a ValueError naming both values."""
    saved = source.config
    given = {name: getattr(args, name) for name in _MODEL_FLAGS if getattr(args, name) is not None}
    given.update({k: v for k, v in (("vae", args.vae), ("in_channels", args.in_channels)) if v is not None})
    run_values = {**{name: getattr(saved.model, name) for name in _MODEL_FLAGS},
                  "vae": saved.data.vae, "in_channels": saved.model.in_channels}
    for name, value in given.items():
        if name == "in_channels" and not is_pixel_space(run_values["vae"]):
            continue  # --in-channels only means something in pixel space (as without a run)
        _refuse_contradiction(name, value, run_values[name], source.where)
    _check_objective_flags(args, saved, source.where)
    speed = {"attn_backend": args.attn_backend, "adaln_backend": args.adaln_backend}
    model = dataclasses.replace(saved.model, grad_checkpointing=0.0, **speed)
    return model, saved.diffusion, saved.data.vae, saved.train.objective, saved.transport


_TRANSPORT_FLAGS = ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps")


def _check_objective_flags(args, run, where: str) -> None:
    """--objective and the transport flags beside a run must equal what it was trained with (a REPA
    run: --path-type is REPA's linear | cosine; SiT's other transport flags mean nothing to it)."""
    saved = {"objective": run.train.objective, **dataclasses.asdict(run.transport)}
    if run.train.objective == "repa":
        saved["path_type"] = run.repa.repa_path_type
        _refuse_sit_transport_flags(args)
    for name in ("objective", *_TRANSPORT_FLAGS):
        if getattr(args, name, None) is not None:
            _refuse_contradiction(name, getattr(args, name), saved[name], where)


def _refuse_contradiction(name: str, given, saved, where: str) -> None:
    """A flag given beside a run must equal the run's saved value (ValueError naming both)."""
    if given != saved:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag} {given} contradicts the checkpoint's saved config ({name} = "
                         f"{saved!r} in {where}); drop {flag} (it is read from the run)")


def _refuse_sit_transport_flags(args) -> None:
    given = [k for k in _TRANSPORT_FLAGS[1:] if getattr(args, k, None) is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"{flags}: SiT's transport flags do not apply to a REPA model (REPA's --path-type "
                         "linear | cosine does)")


def repa_path_type(args, source) -> str:
    """REPA's interpolant: the run's saved one, else --path-type (default linear)."""
    if source is not None and source.config is not None:
        return source.config.repa.repa_path_type
    from dit_fast.config import REPA_PATH_TYPES
    path_type = getattr(args, "path_type", None) or "linear"
    if path_type not in REPA_PATH_TYPES:
        raise ValueError(f"--path-type {path_type} with --objective repa: REPA's paths are "
                         f"{', '.join(REPA_PATH_TYPES)}")
    return path_type


def _objective_from_flags(args) -> tuple:
    """(objective, TransportConfig) of the flags (a plain weight file, e.g. SiT-XL-2-256x256.pt)."""
    objective = getattr(args, "objective", None) or "diffusion"  # the export has no flow flags
    if objective == "repa":  # REPA's file: its --path-type is read by repa_path_type
        _refuse_sit_transport_flags(args)
        return objective, TransportConfig()
    given = {k: getattr(args, k) for k in _TRANSPORT_FLAGS if getattr(args, k, None) is not None}
    transport = TransportConfig(**given)
    for ok, message in transport_checks(objective, transport):
        if not ok:
            raise ValueError(message)
    if objective == "diffusion" and given:
        raise ValueError("--path-type / --prediction / --loss-weight / --train-eps / --sample-eps describe a "
                         "flow model: add --objective flow")
    return objective, transport


def _from_flags(args) -> tuple:
    """(ModelConfig, DiffusionConfig, vae) of the flags (official names, plain weight files)."""
    values = {name: getattr(args, name) if getattr(args, name) is not None else MODEL_FLAG_DEFAULTS[name]
              for name in ("model", "image_size", "num_classes")}
    vae = args.vae if args.vae is not None else args.vae_default
    pixel_channels = args.in_channels if args.in_channels is not None else 3
    if pixel_channels < 1:
        raise ValueError(f"--in-channels must be positive, got {pixel_channels}")
    for name in ("num_classes", "depth", "hidden_size", "num_heads"):
        value = values.get(name, getattr(args, name))
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    objective, transport = _objective_from_flags(args)
    model = model_config_from_args(args, **values, in_channels=model_channels(vae, pixel_channels),
                                   learn_sigma=objective != "repa")  # REPA's SiT predicts no sigma
    return model, DiffusionConfig(), vae, objective, transport


def resolve_run(args: argparse.Namespace) -> tuple:
    """(model, diffusion, vae, objective, transport, source) of a command line with add_common_flags'
    model flags: from the run --ckpt names (its saved config), else from the flags; ModelConfig with
    input_size resolved; source None without --ckpt (official). Shared by sample.py, sample_ddp.py
    and the export."""
    from dit_fast.vae import check_vae_spec
    source = resolve_ckpt(args.ckpt) if args.ckpt is not None else None
    if source is not None and source.config is not None:
        return (*_from_saved_run(args, source), source)
    model, diffusion, vae, objective, transport = _from_flags(args)
    check_vae_spec(vae)
    model.input_size = sample_size(model.image_size, vae_downsample(vae), model.patch_size)
    return model, diffusion, vae, objective, transport, source


def resolve_sample_config(args: argparse.Namespace) -> tuple:
    """(SampleConfig, CkptSource or None) of a sample.py / sample_ddp.py command line."""
    model, diffusion, vae, objective, transport, source = resolve_run(args)
    if args.num_sampling_steps < 1:
        raise ValueError(f"--num-sampling-steps must be positive, got {args.num_sampling_steps}")
    if args.cfg_interval is not None and not args.cfg_interval[0] <= args.cfg_interval[1]:
        raise ValueError(f"--cfg-interval LOW HIGH needs LOW <= HIGH, got {args.cfg_interval}")
    flow = _flow_sampling_values(args, objective)
    repa = objective == "repa"
    interval = tuple(args.cfg_interval) if args.cfg_interval else (REPA_CFG_INTERVAL if repa else None)
    scale = args.cfg_scale if args.cfg_scale is not None else (REPA_CFG_SCALE if repa else args.cfg_default)
    resolved = {**flow, "sampler": flow.get("sampler", args.sampler or "ddpm"), "cfg_interval": interval,
                "cfg_scale": scale}
    if repa:  # REPA guides every channel of its velocity
        resolved.update(repa_path_type=repa_path_type(args, source), guide_all_channels=True)
    saved = source.config if source is not None else None
    cfg = SampleConfig.from_args(args, model, diffusion, vae=vae, objective=objective, transport=transport,
                                 latent_norm=saved.data.latent_norm if saved is not None else None, **resolved)
    if source is None and objective in ("flow", "repa"):
        raise ValueError(f"a {objective} model needs --ckpt (a {objective} run, or a checkpoint file such as "
                         "SiT-XL-2-256x256.pt); the official names are DiT's diffusion models")
    if source is None:
        check_official_defaults(model.model, model.image_size, model.num_classes, vae)
    return cfg, source


def load_sampling_vae(cfg: SampleConfig, device):
    """The VAE that decodes ``cfg``'s samples, undoing the run's latent normalisation (None: the VAE
    config's); None in pixel space."""
    from dit_fast.latent_norm import LatentNorm
    from dit_fast.vae import load_vae
    return load_vae(cfg.vae, device=device, norm=LatentNorm.from_dict(cfg.latent_norm, "the run's config"))


def build_sampling_model(model_cfg, weights, device, *, saved: bool = False):
    """The DiT of ``model_cfg`` with ``weights`` (a file, folder or official name), built as the
    original sample.py does (random init, then .to(device), then the checkpoint, then eval()), so
    the global RNG is left in the original's state."""
    from dit_fast.checkpoint import load_into_model, load_state_dict
    from dit_fast.models import build_model

    state = drop_projectors(load_state_dict(weights))  # reading it first draws no random numbers
    overrides = {}
    if not saved:
        # A plain file trained with class_dropout_prob=0 has no null-label row: build it so (it loads,
        # and sampling without guidance works; the sampler refuses guidance with a clear message).
        labels = state.get("y_embedder.embedding_table.weight")
        if labels is not None and labels.shape[0] == model_cfg.num_classes:
            overrides["class_dropout_prob"] = 0.0
    model = build_model(model_cfg, **overrides).to(device)
    m = model_cfg
    hint = (f"the checkpoint does not fit --model {m.model} --image-size/--num-classes/--in-channels "
            f"(input_size={m.input_size}, num_classes={m.num_classes}, in_channels={m.in_channels})")
    load_into_model(model, state, hint=hint)
    return model.eval()  # important: class dropout is a training-only behaviour


def drop_projectors(state: dict) -> dict:
    """A REPA checkpoint's DiT/SiT weights: its ``projectors.*`` (training-only) are dropped, said once."""
    dropped = [k for k in state if k.startswith("projectors.")]
    if not dropped:
        return state
    print(f"Dropped {len(dropped)} REPA projector tensors (projectors.*): sampling needs only the SiT/DiT")
    return {k: v for k, v in state.items() if not k.startswith("projectors.")}


def sampler_of(cfg: SampleConfig, model, *, use_cfg: bool):
    """The sampler a resolved SampleConfig asks for: the diffusion's (--sampler) or, for a flow model,
    SiT's ODE / SDE (--mode and SiT's flags), each with the guidance options."""
    from .build import build_sampler
    common = dict(cfg_scale=cfg.cfg_scale, num_classes=cfg.model.num_classes, use_cfg=use_cfg,
                  precision=cfg.precision, guide_all_channels=cfg.guide_all_channels,
                  cfg_interval=cfg.cfg_interval)
    if cfg.objective == "repa":
        return build_sampler(model, cfg.repa_path_type, method=f"repa-{cfg.mode.lower()}",
                             num_steps=cfg.num_sampling_steps, heun=cfg.heun, **common)
    if cfg.objective != "flow":
        return build_sampler(model, build_diffusion(cfg), method=cfg.sampler, **common)
    from dit_fast.transport import create_transport
    options = {k: getattr(cfg, k) for k in FLOW_SAMPLING_DEFAULTS if k != "mode"}
    return build_sampler(model, create_transport(**dataclasses.asdict(cfg.transport)),
                         method=cfg.mode.lower(), num_steps=cfg.num_sampling_steps, **common, **options)


def build_diffusion(cfg: SampleConfig):
    """The trained diffusion of ``cfg`` respaced to its sampling steps."""
    from dit_fast.diffusion import create_diffusion
    d = cfg.diffusion
    return create_diffusion(str(cfg.num_sampling_steps), noise_schedule=d.noise_schedule,
                            diffusion_steps=d.diffusion_steps, learn_sigma=cfg.model.learn_sigma)


def format_sample_config(cfg: SampleConfig) -> str:
    """The resolved SampleConfig, one ``sample.key = value`` per line (printed at start)."""
    lines = []
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict):
            lines += [f"sample.{key}.{k} = {v!r}" for k, v in value.items()]
        else:
            lines.append(f"sample.{key} = {value!r}")
    return "\n".join(lines)


def resolve_device(name: Optional[str], tf32: bool = True, model=None) -> torch.device:
    """The sampling device; on CUDA also applies the TF32 choice (the original turns TF32 on).
    A device that cannot exist here, or (with ``model``, a ModelConfig) a backend that cannot run on
    it, is a ValueError naming the flag."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {name}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if model is not None:
        from dit_fast.dispatch import check_backends
        check_backends(model.attn_backend, model.adaln_backend, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if tf32:  # cuDNN's TF32 is on by default anyway; sample_ddp.py's --no-tf32 leaves it, as the original
            torch.backends.cudnn.allow_tf32 = True
    return device


def run_cli(main: Callable, prog: str, argv=None) -> None:
    """Run a sampling CLI's ``main``; library errors (bad flags, missing checkpoint or VAE, diffusers
    missing for a solver) exit with one clear line and exit code 2 instead of a traceback (dit_fast.cli)."""
    from dit_fast.cli import run_entry
    code = run_entry(main, prog, argv)
    if code:
        sys.exit(code)
