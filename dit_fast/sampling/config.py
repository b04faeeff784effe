"""sample.py / sample_ddp.py's config: a ModelConfig and a DiffusionConfig (or TransportConfig) from the
one config tree (dit_fast.config), plus how images are drawn. Built by flags.resolve_sample_config from
the command line and, for our runs, the run's saved config.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from dit_fast.config import DEFAULT_CLASS_LABELS, DiffusionConfig, ModelConfig, TransportConfig


@dataclass
class SampleConfig:
    """sample.py / sample_ddp.py: which model and how images are drawn (flag names as in DiT's scripts)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (read from the run's saved config when --ckpt is one of our runs)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The trained diffusion (schedule, steps); sampling respaces it to num_sampling_steps."""
    vae: str = "mse"
    """ema | mse | a local diffusers directory | none (pixel space)."""
    cfg_scale: float = 4.0
    """Guidance scale (sample.py: 4.0, always the CFG forward; sample_ddp.py: 1.5, no CFG at 1.0)."""
    num_sampling_steps: int = 250
    """Respaced diffusion steps."""
    sampler: str = "ddpm"
    """ddpm (ancestral, as the original), ddim (eta 0), or a diffusers solver: dpm-solver++, unipc, euler, heun."""
    ckpt: Optional[str] = None
    """A run dir, a checkpoints/step-NNNNNNN dir, a checkpoint file or an official name; None: the
    official DiT-XL/2 checkpoint for image_size."""
    guide_all_channels: bool = False
    """Guide every input channel; default: the first three, as the original (needed for 1-2 channel models)."""
    compile: bool = False
    """torch.compile the per-step function (CFG forward + update) once, static shapes, fullgraph."""
    compile_mode: Optional[str] = None
    """torch.compile mode; None: reduce-overhead (CUDA graphs) on CUDA, default on CPU."""
    precision: str = "fp32"
    """fp32 | bf16 | fp16: autocast of the model call only; the diffusion math stays fp32."""
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
    evaluate: Optional[str] = None
    """sample_ddp.py: a reference batch .npz; after the samples' .npz, ADM's metrics (evaluate.py's
    code) are written beside it."""
    inception_weights: Optional[str] = None
    """sample_ddp.py --evaluate: the 2015 Inception weights file; None: torch hub's cache."""
    latent_norm: Optional[dict] = None
    """The run's latent normalisation (its data.latent_norm), undone before the VAE decodes; None:
    the --vae config's scaling_factor / shift_factor (SD: 0.18215)."""
    cfg_interval: Optional[tuple] = None
    """Guide only at model times in [low, high] (Kynkaanniemi et al. 2024), in the objective's own
    coordinate: diffusion, the original 1000-step chain's timestep (0 = data, 999 = noise); flow,
    SiT's t (0 = noise, 1 = data); repa, REPA's t (0 = data, 1 = noise). Outside it: one unguided
    forward of the conditional half. None: guide every step."""
    objective: str = "diffusion"
    """diffusion (DiT's sampler flags), flow (SiT's --mode ODE|SDE and below) or repa (REPA's samplers,
    --mode SDE|ODE); read from a run."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """The trained transport (objective flow), read from the run's saved config or the flags."""
    mode: str = "ODE"
    """flow: ODE (probability flow) or SDE (SiT's --mode)."""
    sampling_method: Optional[str] = None
    """flow: ODE solver (euler, heun, midpoint: ours; dopri5 ...: torchdiffeq) or SDE method
    (Euler, Heun); None: SiT's defaults, dopri5 / Euler."""
    atol: float = 1e-6
    """flow ODE: absolute tolerance of an adaptive solver (SiT's default)."""
    rtol: float = 1e-3
    """flow ODE: relative tolerance of an adaptive solver (SiT's default)."""
    reverse: bool = False
    """flow ODE: integrate from data to noise (SiT's --reverse)."""
    diffusion_form: str = "sigma"
    """flow SDE: w_t's form (SiT's sample.py default sigma; SBDM is singular for velocity models)."""
    diffusion_norm: float = 1.0
    """flow SDE: w_t's scale."""
    last_step: Optional[str] = "Mean"
    """flow SDE: final step Mean | Tweedie | Euler | None."""
    last_step_size: float = 0.04
    """flow SDE: size of the final step."""
    repa_path_type: str = "linear"
    """repa: REPA's interpolant (linear | cosine), read from the run or --path-type."""
    heun: bool = False
    """repa ODE: Heun's correction (REPA's --heun; --sampling-method heun)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: ModelConfig,
                  diffusion: Optional[DiffusionConfig] = None, **resolved) -> "SampleConfig":
        """The config of a sample.py / sample_ddp.py command line with its resolved model (flags a
        script lacks keep defaults; ``resolved`` overrides parsed values, e.g. the saved VAE)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"model", "diffusion", "transport"}
        values = {k: v for k, v in vars(args).items() if k in names}
        return cls(model=model, diffusion=diffusion or DiffusionConfig(), **{**values, **resolved})
