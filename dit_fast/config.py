"""One typed config tree for dit_fast: CLI -> Config -> components.

Every knob is a dataclass field with a docstring (the string literal under it). Each component gets
only its own section (``cfg.model`` to build the DiT, ``cfg.train`` for the loop, ...). The resolved
tree is printed at start, saved as ``config.json`` in the run dir and, as a plain dict, in every
checkpoint (so checkpoints load with ``torch.load(weights_only=True)``).

    cfg = config_from_args(args)        # argparse.Namespace from train.py
    print(format_config(cfg))
    save_config(cfg, run_dir / "config.json")
    cfg2 = config_from_dict(config_to_dict(cfg))   # == cfg
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .atomic import atomic_write_text

# The one precision table: flag value -> torch dtype (of DeepSpeed's working weights in training,
# of autocast in sampling, where fp32 means no autocast).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(PRECISION_DTYPES)
DEFAULT_CLASS_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # the original sample.py's eight


@dataclass
class ModelConfig:
    """Which DiT to build and its speed switches (switches never change the numbers)."""

    model: str = "DiT-XL/2"
    """Name in ``dit_fast.models.DiT_models`` (``DiT-XL/2`` ... ``DiT-S/8``)."""
    image_size: int = 256
    """Image side in pixels; the model's input is ``image_size // downsample`` (8 with the SD VAE)."""
    num_classes: int = 1000
    """Number of class labels; the data's labels must lie in [0, num_classes)."""
    learn_sigma: bool = True
    """Predict the variance too (out_channels = 2 * in_channels), as DiT does."""
    class_dropout_prob: float = 0.1
    """Label dropout for classifier-free guidance."""
    in_channels: Optional[int] = None
    """Latent channels; derived from the data (the autoencoder config's latent_channels: 4 for the SD
    VAEs, 16 for SD3/FLUX's; 3/1 for pixels)."""
    input_size: Optional[int] = None
    """Latent (or pixel) side the model sees; derived from image_size and the VAE downsample."""
    depth: Optional[int] = None
    """Override the named model's depth (small test models, ablations); None keeps the name's."""
    hidden_size: Optional[int] = None
    """Override the named model's width; None keeps the name's."""
    num_heads: Optional[int] = None
    """Override the named model's head count; None keeps the name's."""
    attn_backend: str = "sdpa"
    """Attention backend (see dit_fast.dispatch): sdpa | math | triton | flash_attn | xformers | auto."""
    adaln_backend: str = "torch"
    """adaLN ops (see dit_fast.dispatch): torch (the original's) | triton (fused kernels) | auto;
    --fused-adaln is its alias for triton."""
    grad_checkpointing: float | str = 0.0
    """Fraction of blocks (0..1) whose activations are recomputed in backward (1.0 = all), or
    "selective": every block, keeping each fc2 output (the costliest recompute per byte)."""

    @property
    def patch_size(self) -> int:
        """The patch size encoded in the model name (``DiT-XL/2`` -> 2)."""
        from .models import patch_size_of
        return patch_size_of(self.model)


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion used for the loss (DiT's create_diffusion arguments)."""

    diffusion_steps: int = 1000
    """Number of training timesteps T; t ~ randint(0, T) per sample."""
    noise_schedule: str = "linear"
    """Beta schedule (DiT: linear)."""
    timestep_respacing: str = ""
    """Training uses the full chain (DiT: "")."""


@dataclass
class DataConfig:
    """Where the training data comes from."""

    features_path: Optional[str] = None
    """Pre-extracted latents (extract_features.py output): the fast path."""
    data_path: Optional[str] = None
    """Raw ImageFolder tree (one folder per class); encoded by the VAE on the fly."""
    vae: str = "ema"
    """VAE for --data-path: ema | mse | a local dir | a repo id | none (pixel-space data)."""
    num_workers: int = 4
    """DataLoader worker processes per rank."""
    random_flip: bool = True
    """Pick the image or its horizontal flip at random each time it is seen."""
    latent_norm: Optional[dict] = None
    """How the latents the model sees were normalised (dit_fast.latent_norm record; resolved from
    the features' index.json, or the --vae config with --data-path; None in pixel space):
    {"mode": "config", "scale", "shift"} or {"mode": "channel", "mean", "std"}. Sampling decodes
    with it."""


@dataclass
class OptimConfig:
    """AdamW exactly as DiT: lr 1e-4, no weight decay, constant learning rate."""

    lr: float = 1e-4
    """Learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple = (0.9, 0.999)
    """AdamW betas (torch defaults, as DiT)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 0.0
    """Gradient-norm clipping threshold; 0 disables it (DiT does not clip)."""


@dataclass
class TrainConfig:
    """The training loop: batch, precision, duration, logging, checkpoints."""

    global_batch_size: int = 256
    """Images per optimizer step over all ranks (= micro batch x grad accumulation x world size)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    micro_batch_size: Optional[int] = None
    """Per-rank micro batch; derived from global batch, accumulation and world size."""
    precision: str = "bf16"
    """bf16 | fp16 (dynamic loss scaling) | fp32: DeepSpeed's mixed-precision mode."""
    epochs: int = 1400
    """Passes over the data (DiT's default); --max-steps may stop earlier."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (counted from the start of the run, across resumes)."""
    global_seed: int = 0
    """Seed; rank r uses global_seed * world_size + r, as DiT."""
    log_every: int = 100
    """Log the averaged loss every N steps."""
    ckpt_every: int = 50_000
    """Save a checkpoint every N steps (and always at the end)."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints (0 keeps all)."""
    results_dir: str = "results"
    """Parent of the per-run directories ``NNN-<model>``."""
    resume: Optional[str] = None
    """A checkpoint dir, or "auto" for the newest complete one under results_dir."""
    compile: bool = False
    """torch.compile each transformer block before wrapping in DeepSpeed."""
    deepspeed_config: Optional[str] = None
    """ZeRO-knobs JSON (configs/deepspeed/zero2.json ...); None = ZeRO stage 0."""
    ema_decay: float = 0.9999
    """EMA decay per optimizer step (fp32 EMA, DiT's 0.9999)."""
    objective: str = "diffusion"
    """What the network learns: diffusion (DiT's DDPM loss, cfg.diffusion) or flow (SiT's flow
    matching, cfg.transport); dit_fast.train.objective builds it."""
    collective_timeout: float = 600.0
    """Seconds any collective (or DataLoader worker) may wait; past it the job fails naming the
    step and the rank that did not arrive, instead of idling until someone kills it."""
    ignore_disk_check: bool = False
    """Start even when the results filesystem's free space cannot hold one checkpoint."""
    # ---- --init-from (dit_fast.checkpoint.init_from) ----
    init_from: Optional[str] = None
    """Start a NEW run from these weights (official name, EMA / .pt / .safetensors file, run or
    step directory, diffusers folder): step 0, fresh optimizer, EMA = the loaded weights. Another
    --num-classes rebuilds the label table, another --image-size the fixed positional table."""
    keep_labels: bool = False
    """With --init-from and another --num-classes: keep the label vectors of the classes both
    models have (0..min-1); without it every class row starts from the initialisation."""


OBJECTIVES = ("diffusion", "flow", "repa")  # train.objective (dit_fast/train/objective.py builds each)
PATH_TYPES = ("Linear", "GVP", "VP")        # SiT's --path-type
PREDICTIONS = ("velocity", "score", "noise")  # SiT's --prediction
LOSS_WEIGHTS = (None, "velocity", "likelihood")  # SiT's --loss-weight (None: unweighted)


@dataclass
class TransportConfig:
    """SiT's flow-matching transport (dit_fast.transport.create_transport's arguments), used when
    train.objective is "flow"; t = 0 is noise and t = 1 data."""

    path_type: str = "Linear"
    """Interpolant: Linear (x_t = t x1 + (1 - t) x0), GVP (sin / cos) or VP (the VP-SDE's marginals)."""
    prediction: str = "velocity"
    """What the network predicts: velocity, score or noise."""
    loss_weight: Optional[str] = None
    """Score / noise loss weighting: None, velocity or likelihood (a velocity loss is never weighted)."""
    train_eps: Optional[float] = None
    """How far training times stay from a singular end; None: SiT's default for the path/prediction."""
    sample_eps: Optional[float] = None
    """How far sampling times stay from a singular end; None: SiT's default."""


REPA_PATH_TYPES = ("linear", "cosine")      # REPA's --path-type
REPA_WEIGHTINGS = ("uniform", "lognormal")  # REPA's --weighting


@dataclass
class RepaConfig:
    """REPA (Yu et al. 2025), used when train.objective is "repa": the velocity loss in REPA's time
    (data at t = 0, noise at t = 1) plus proj_coeff x the alignment of block ``encoder_depth``'s tokens,
    through the projector, with a frozen encoder's patch tokens. Flag names are REPA's."""

    enc_type: str = "dinov2-vit-b"
    """The frozen encoder: dinov2-vit-<s|b|l|g> or dinov2reg-vit-<s|b|l|g> (with registers)."""
    encoder: Optional[str] = None
    """A local transformers save_pretrained folder or a hub id; None: facebook/dinov2-<size>."""
    encoder_depth: int = 8
    """The block whose output tokens are aligned (1-based: after the first encoder_depth blocks)."""
    proj_coeff: float = 0.5
    """Weight of the alignment loss."""
    projector_dim: int = 2048
    """Hidden width of the 3-layer SiLU projector."""
    repa_path_type: str = "linear"
    """REPA's interpolant (its --path-type): linear (1 - t, t) or cosine (cos, sin of pi t / 2)."""
    weighting: str = "uniform"
    """How t is drawn: uniform, or lognormal (sigma = exp of a standard normal, mapped to t)."""


@dataclass
class EvalConfig:
    """Evaluation during training (dit_fast.train.evaluate): ADM's FID and the others on samples of
    the EMA weights every eval_every steps; off (0) by default."""

    eval_every: int = 0
    """Evaluate every N optimizer steps (0 = never)."""
    eval_samples: int = 1000
    """Samples per evaluation over all ranks (each rank draws its share)."""
    eval_ref: Optional[str] = None
    """Reference batch .npz (ADM's, or arr_0 uint8 images of your own; mu/sigma alone give FID only)."""
    inception_weights: Optional[str] = None
    """torch-fidelity's 2015 Inception weights file; None: torch hub's cache."""
    eval_sampler: Optional[str] = None
    """diffusion: a --sampler name (default dpm-solver++); flow: an ODE method (default heun) or sde."""
    eval_steps: int = 25
    """Sampling steps (respaced steps, solver steps, or ODE/SDE steps)."""
    eval_cfg_scale: float = 1.0
    """Guidance scale of the evaluation samples (1.0: unguided, as training curves usually are)."""
    eval_batch_size: int = 32
    """Samples per rank per sampling batch (and per Inception batch)."""


# The sampling scripts' config (which holds a ModelConfig) is dit_fast.sampling.config.SampleConfig.


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model section."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Diffusion section."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data section."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer section."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training-loop section."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """Flow-matching section (train.objective "flow")."""
    repa: RepaConfig = field(default_factory=RepaConfig)
    """Representation-alignment section (train.objective "repa")."""
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training (off by default)."""


_SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
             "optim": OptimConfig, "train": TrainConfig, "transport": TransportConfig, "repa": RepaConfig,
             "evaluation": EvalConfig}


def checkpointing_arg(text: str) -> float | str:
    """--grad-checkpointing's value: a fraction of blocks, or "selective"."""
    if text.strip().lower() == "selective":
        return "selective"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fraction of blocks in [0, 1] or 'selective', got {text!r}") from None


def _arg_map() -> dict[str, tuple[str, str]]:
    """CLI dest -> (section, field): a flag's dest is its field's name (``--global-batch-size`` ->
    train.global_batch_size); field names are unique across sections, so the map is derived."""
    out: dict[str, tuple[str, str]] = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in out:
                raise AssertionError(f"config field {f.name!r} is in sections {out[f.name][0]!r} and {section!r}")
            out[f.name] = (section, f.name)
    return out


_ARG_MAP = _arg_map()


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the tree from parsed CLI flags (unknown or None-valued flags keep the defaults)."""
    cfg = Config()
    repa = getattr(args, "objective", None) == "repa"
    for dest, (section, name) in _ARG_MAP.items():
        value = getattr(args, dest, None)
        if value is not None and not (repa and dest == "path_type"):
            setattr(getattr(cfg, section), name, value)
    if repa:  # REPA's --path-type (linear | cosine) shares SiT's flag, whose default is "Linear"
        path_type = getattr(args, "path_type", None) or cfg.repa.repa_path_type
        cfg.repa.repa_path_type = "linear" if path_type == "Linear" else path_type
        cfg.model.learn_sigma = False  # REPA's SiT predicts no sigma
    _check_repa_flags_need_repa(args, repa)
    validate_config(cfg)
    return cfg


def _check_repa_flags_need_repa(args: argparse.Namespace, repa: bool) -> None:
    """REPA's own flags beside another objective would be silently ignored: refuse them."""
    given = [f.name for f in dataclasses.fields(RepaConfig)
             if f.name != "repa_path_type" and getattr(args, f.name, None) is not None]
    if given and not repa:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: REPA's flags need --repa")


def validate_config(cfg: Config) -> None:
    """Raise ValueError for values that can never work, naming the flag to change."""
    m, t, d = cfg.model, cfg.train, cfg.data
    checks = [
        (t.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {t.precision!r}"),
        (m.grad_checkpointing == "selective" or
         (not isinstance(m.grad_checkpointing, str) and 0.0 <= m.grad_checkpointing <= 1.0),
         f"--grad-checkpointing is a fraction of blocks in [0, 1] or 'selective', got {m.grad_checkpointing}"),
        (t.global_batch_size > 0, f"--global-batch-size must be positive, got {t.global_batch_size}"),
        (t.grad_accum > 0, f"--grad-accum must be positive, got {t.grad_accum}"),
        (t.log_every > 0, f"--log-every must be positive, got {t.log_every}"),
        (t.ckpt_every > 0, f"--ckpt-every must be positive, got {t.ckpt_every}"),
        (t.keep_last >= 0, f"--keep-last must be >= 0, got {t.keep_last}"),
        (t.max_steps is None or t.max_steps > 0, f"--max-steps must be positive, got {t.max_steps}"),
        (0.0 <= t.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {t.ema_decay}"),
        (t.global_seed >= 0, f"--global-seed must be >= 0 (numpy seeds the flips), got {t.global_seed}"),
        (t.collective_timeout > 0,
         f"--collective-timeout is in seconds and must be positive, got {t.collective_timeout}"),
        (d.num_workers >= 0, f"--num-workers must be >= 0, got {d.num_workers}"),
        (m.num_classes > 0, f"--num-classes must be positive, got {m.num_classes}"),
        (m.image_size > 0, f"--image-size must be positive, got {m.image_size}"),
        (cfg.optim.lr > 0, f"--lr must be positive, got {cfg.optim.lr}"),
        (cfg.optim.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.optim.weight_decay}"),
        (t.epochs > 0, f"--epochs must be positive, got {t.epochs}"),
        (all(v is None or v > 0 for v in (m.depth, m.hidden_size, m.num_heads)),
         "--depth, --hidden-size and --num-heads must be positive"),
        (cfg.optim.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {cfg.optim.grad_clip}"),
        (bool(d.features_path) != bool(d.data_path),
         "give exactly one of --features-path (pre-extracted latents) or --data-path (images)"),
    ]
    for ok, message in checks + transport_checks(t.objective, cfg.transport) + repa_checks(cfg):
        if not ok:
            raise ValueError(message)
    from .models import patch_size_of
    patch_size_of(m.model)  # an unknown --model raises, naming the choices
    _check_width(m)


def transport_checks(objective: str, tc: TransportConfig) -> list:
    """(ok, message) pairs for --objective and SiT's transport flags (training and sampling share them)."""
    def eps_ok(value):
        return value is None or 0.0 <= value < 0.5
    return [
        (objective in OBJECTIVES, f"--objective must be one of {OBJECTIVES}, got {objective!r}"),
        (tc.path_type in PATH_TYPES, f"--path-type must be one of {PATH_TYPES}, got {tc.path_type!r}"),
        (tc.prediction in PREDICTIONS, f"--prediction must be one of {PREDICTIONS}, got {tc.prediction!r}"),
        (tc.loss_weight in LOSS_WEIGHTS,
         f"--loss-weight must be one of {LOSS_WEIGHTS[1:]} (or absent), got {tc.loss_weight!r}"),
        (eps_ok(tc.train_eps) and eps_ok(tc.sample_eps),
         f"--train-eps and --sample-eps must be in [0, 0.5), got {tc.train_eps} and {tc.sample_eps}"),
    ]


def repa_checks(cfg: Config) -> list:
    """(ok, message) pairs for REPA's flags (train.objective "repa" only)."""
    r, m = cfg.repa, cfg.model
    if cfg.train.objective != "repa":
        return []
    from .repa.encoder import parse_enc_type
    try:
        parse_enc_type(r.enc_type)
        enc_ok, enc_message = True, ""
    except ValueError as err:
        enc_ok, enc_message = False, str(err)
    return [
        (enc_ok, enc_message),
        (r.encoder_depth >= 1, f"--encoder-depth must be >= 1, got {r.encoder_depth}"),
        (r.proj_coeff >= 0, f"--proj-coeff must be >= 0, got {r.proj_coeff}"),
        (r.projector_dim > 0, f"--projector-dim must be positive, got {r.projector_dim}"),
        (r.repa_path_type in REPA_PATH_TYPES,
         f"--path-type with --repa must be one of {REPA_PATH_TYPES} (REPA's), got {r.repa_path_type!r}"),
        (r.weighting in REPA_WEIGHTINGS, f"--weighting must be one of {REPA_WEIGHTINGS}, got {r.weighting!r}"),
        (m.image_size % 16 == 0, f"--image-size {m.image_size} with --repa must be a multiple of 16 "
                                 "(224 px of encoder input per 256 px, in 14 px patches)"),
    ]


def add_transport_flags(parser: argparse.ArgumentParser, *, defaults: bool = False) -> None:
    """--objective and SiT's transport flags, with SiT's names (train.py, sample.py, sample_ddp.py).
    ``defaults=False`` leaves them None, so sampling can tell a given flag from the run's value."""
    a = parser.add_argument
    a("--objective", type=str, default="diffusion" if defaults else None, metavar="|".join(OBJECTIVES),
      help="diffusion (DiT's), flow (SiT's flow matching) or repa (REPA's; train.py --repa); "
           "sampling a run reads it")
    a("--path-type", type=str, default="Linear" if defaults else None, metavar="|".join(PATH_TYPES),
      help="flow: the interpolant")
    a("--prediction", type=str, default="velocity" if defaults else None, metavar="|".join(PREDICTIONS),
      help="flow: what the network predicts")
    a("--loss-weight", type=str, default=None, metavar="velocity|likelihood",
      help="flow: score/noise loss weighting (None: unweighted)")
    a("--train-eps", type=float, default=None, help="flow: training time margin (default: SiT's)")
    a("--sample-eps", type=float, default=None, help="flow: sampling time margin (default: SiT's)")


def _check_width(m: ModelConfig) -> None:
    """--hidden-size must split into --num-heads heads (else the model build fails much later)."""
    if m.hidden_size is None and m.num_heads is None:
        return
    from . import models
    _, width, heads = models._SIZES[m.model[len("DiT-"):].split("/")[0]]
    width, heads = m.hidden_size or width, m.num_heads or heads
    if width % heads:
        raise ValueError(f"--hidden-size {width} is not divisible by --num-heads {heads}")


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of built-in types (JSON- and weights_only-safe)."""
    out = dataclasses.asdict(cfg)
    out["optim"]["betas"] = list(out["optim"]["betas"])
    return out


def config_from_dict(d: dict) -> Config:
    """Inverse of config_to_dict; unknown sections/keys raise so stale files are noticed."""
    sections = {}
    for name, cls in _SECTIONS.items():
        values = dict(d.get(name, {}))
        if name == "model" and "fused_adaln" in values:  # configs saved before adaln_backend
            from .dispatch import adaln_backend_name
            values.setdefault("adaln_backend", adaln_backend_name(values.pop("fused_adaln")))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"config section {name!r} has unknown keys {sorted(unknown)}")
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        sections[name] = cls(**values)
    return Config(**sections)


def format_config(cfg: Config) -> str:
    """Human-readable dump, one ``section.key = value`` per line."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines += [f"{section}.{k} = {v!r}" for k, v in values.items()]
    return "\n".join(lines)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as JSON (atomically, dit_fast.atomic)."""
    return atomic_write_text(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")


def load_config(path: str | os.PathLike) -> Config:
    """Read a config.json written by save_config."""
    return config_from_dict(json.loads(Path(path).read_text()))


# Flags that define the model (shared by train.py, sample.py, sample_ddp.py, the export, the demo).
MODEL_FLAG_DEFAULTS = {"model": "DiT-XL/2", "image_size": 256, "num_classes": 1000}


def add_model_flags(parser: argparse.ArgumentParser, *, defaults: bool | Mapping = True,
                    show_size_overrides: bool = True, model_choices: bool = True) -> None:
    """--model, --image-size, --num-classes, --depth/--hidden-size/--num-heads and the speed switches
    --attn-backend / --fused-adaln, with DiT's names.

    ``defaults=False`` leaves the model-defining flags at None, so a caller that reads the model from
    a saved config can tell a flag that was given from one that was not; a mapping gives other
    defaults by flag dest (the demo's small DiT). ``model_choices=False`` leaves an unknown --model to
    validate_config (train.py's message names the choices too).
    """
    from .models import DiT_models
    own = dict(defaults) if isinstance(defaults, Mapping) else {}

    def default(name):
        return own.get(name, MODEL_FLAG_DEFAULTS.get(name)) if defaults is not False else None

    shown = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)  # adds "(default: X)"

    def says(name):  # the default in the help text, unless the formatter already prints it
        return "" if shown else f" (default {default(name) or MODEL_FLAG_DEFAULTS[name]})"

    a = parser.add_argument
    a("--model", type=str, choices=list(DiT_models.keys()) if model_choices else None, default=default("model"),
      help="name in dit_fast.models.DiT_models" + says("model"))
    a("--image-size", type=int, default=default("image_size"),
      help="pixels; divisible by 8 x patch (VAE) or by the patch size (--vae none)" + says("image_size"))
    a("--num-classes", type=int, default=default("num_classes"), help="class labels" + says("num_classes"))
    size_help = "custom-size model: override the {}" if show_size_overrides else None
    for flag, what in (("--depth", "depth"), ("--hidden-size", "width"), ("--num-heads", "heads")):
        a(flag, type=int, default=own.get(flag[2:].replace("-", "_")),
          help=size_help.format(what) if size_help else argparse.SUPPRESS)
    a("--attn-backend", type=str, default="sdpa",
      help="sdpa | math | triton | flash_attn | xformers | auto (dit_fast.dispatch)")
    adaln = parser.add_mutually_exclusive_group()
    adaln.add_argument("--adaln-backend", choices=("torch", "triton", "auto"), default="torch",
                       help="adaLN ops: torch (the original's), triton (fused kernels) or auto")
    adaln.add_argument("--fused-adaln", dest="adaln_backend", action="store_const", const="triton",
                       help="the fused Triton adaLN kernels (= --adaln-backend triton)")


def model_flags(m: ModelConfig) -> list[str]:
    """The flags add_model_flags reads back into ``m`` (a child train.py command: the demo)."""
    flags = ["--model", m.model, "--image-size", str(m.image_size), "--num-classes", str(m.num_classes)]
    for name in ("depth", "hidden_size", "num_heads"):
        if getattr(m, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(m, name))]
    return flags + ["--attn-backend", m.attn_backend, "--adaln-backend", m.adaln_backend]


def model_config_from_args(args: argparse.Namespace, **resolved) -> ModelConfig:
    """The ModelConfig of parsed model flags (None-valued flags keep the defaults), plus ``resolved``
    values (in_channels, input_size, learn_sigma, ...) computed by the caller."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return ModelConfig(**{**values, **resolved})
