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
    """Latent channels; derived from the data (4 for SD-VAE latents, 3/1 for pixels)."""
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
    fused_adaln: bool = False
    """Use the fused (Triton) adaLN-modulated LayerNorm / gated residual kernels."""
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
    collective_timeout: float = 600.0
    """Seconds any collective (or DataLoader worker) may wait; past it the job fails naming the
    step and the rank that did not arrive, instead of idling until someone kills it."""
    ignore_disk_check: bool = False
    """Start even when the results filesystem's free space cannot hold one checkpoint."""


# ---- sampling section: the sampling owner adds SampleConfig here (keep Config's field order) ----


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


_SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
             "optim": OptimConfig, "train": TrainConfig}


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
    for dest, (section, name) in _ARG_MAP.items():
        value = getattr(args, dest, None)
        if value is not None:
            setattr(getattr(cfg, section), name, value)
    validate_config(cfg)
    return cfg


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
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    from .models import patch_size_of
    patch_size_of(m.model)  # an unknown --model raises, naming the choices
    _check_width(m)


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


@dataclass
class SampleConfig:
    """sample.py / sample_ddp.py: how images are drawn (flag names as in DiT's scripts)."""

    model: str = "DiT-XL/2"
    """Name in dit_fast.models.DiT_models."""
    image_size: int = 256
    """Output side in pixels; the model input is image_size // VAE downsampling (8), or image_size with vae none."""
    num_classes: int = 1000
    """Classes of the model; the null label used by guidance is num_classes itself."""
    cfg_scale: float = 4.0
    """Guidance scale (sample.py: 4.0, always the CFG forward; sample_ddp.py: 1.5, no CFG at 1.0)."""
    num_sampling_steps: int = 250
    """Respaced diffusion steps."""
    sampler: str = "ddpm"
    """ddpm (ancestral, as the original), ddim (eta 0), or a diffusers solver: dpm-solver++, unipc, euler, heun."""
    ckpt: Optional[str] = None
    """Checkpoint path or official name; None: the official DiT-XL/2 checkpoint for image_size."""
    vae: str = "mse"
    """ema | mse | a local diffusers directory | none (pixel space)."""
    in_channels: int = 3
    """Image channels of a pixel-space (vae none) model."""
    depth: Optional[int] = None
    """Override the named model's depth (a custom-size model trained with train.py --depth)."""
    hidden_size: Optional[int] = None
    """Override the named model's width (train.py --hidden-size)."""
    num_heads: Optional[int] = None
    """Override the named model's head count (train.py --num-heads)."""
    guide_all_channels: bool = False
    """Guide every input channel; default: the first three, as the original (needed for 1-2 channel models)."""
    compile: bool = False
    """torch.compile the per-step function (CFG forward + update) once, static shapes, fullgraph."""
    compile_mode: Optional[str] = None
    """torch.compile mode; None: reduce-overhead (CUDA graphs) on CUDA, default on CPU."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16: autocast of the model call only; the diffusion math stays fp32."""
    attn_backend: str = "sdpa"
    """Attention backend (dit_fast.dispatch)."""
    fused_adaln: bool = False
    """Fused adaLN kernels (dit_fast.dispatch)."""
    tf32: bool = True
    """TF32 matmuls on CUDA (the original turns them on)."""
    device: Optional[str] = None
    """Sampling device; None: cuda if available, else cpu."""
    seed: int = 0
    """sample.py: torch.manual_seed before building anything, as the original."""
    class_labels: list = field(default_factory=lambda: list(DEFAULT_CLASS_LABELS))
    """sample.py: one image per label (default: the original's eight)."""
    out: str = "sample.png"
    """sample.py: path of the PNG grid."""
    global_seed: int = 0
    """sample_ddp.py: seeds every batch from (global_seed, rank, batch index)."""
    per_proc_batch_size: int = 32
    """sample_ddp.py: images per process per batch."""
    num_fid_samples: int = 50_000
    """sample_ddp.py: images in the .npz."""
    sample_dir: str = "samples"
    """sample_ddp.py: parent folder of the PNG folder and the .npz."""
    fid_ref: Optional[str] = None
    """sample_ddp.py: reference statistics (.npz with mu, sigma) for an optional in-process FID."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SampleConfig":
        """The config of a sample.py / sample_ddp.py command line (flags a script lacks keep defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
