"""The DeepSpeed side of training: the injected DeepSpeed config, then model -> activation
checkpointing (constructor flag) -> compile -> optimizer -> engine, with the EMA copy taken in between.

Checks that can fail on user input run before any step and raise ValueError / FileNotFoundError
with what was wrong and the flag or key to change.
"""
from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..config import PRECISION_DTYPES, Config
from ..models import build_model
from .ema import EMA

# Keys train.py injects into the DeepSpeed JSON (one source of truth: the command line).
_FLAG_FOR_KEY = {
    "train_batch_size": "--global-batch-size",
    "train_micro_batch_size_per_gpu": "--global-batch-size / --grad-accum / world size",
    "gradient_accumulation_steps": "--grad-accum",
    "gradient_clipping": "--grad-clip",
}
_PRECISION_BLOCKS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16"}


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed JSON contradicts the command line."""


# ---------------------------------------------------------------- DeepSpeed config

def micro_batch_size(cfg: Config, world_size: int) -> int:
    """The per-rank micro batch; the global batch must be micro x accumulation x world."""
    t = cfg.train
    per_step = world_size * t.grad_accum
    if t.global_batch_size % per_step:
        raise ValueError(
            f"--global-batch-size {t.global_batch_size} is not divisible by world size "
            f"{world_size} x --grad-accum {t.grad_accum} = {per_step}")
    return t.global_batch_size // per_step


def load_deepspeed_json(path: str | None) -> dict:
    if not path:
        return {"zero_optimization": {"stage": 0}}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path!r} does not exist (see configs/deepspeed/)")
    try:
        user = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeepSpeedConfigError(f"--deepspeed_config {path!r} is not valid JSON: {err}") from err
    if not isinstance(user, dict):
        raise DeepSpeedConfigError(f"--deepspeed_config {path!r} holds a JSON {type(user).__name__}, "
                                   "not an object of DeepSpeed keys")
    stage = user.get("zero_optimization", {}).get("stage", 0) if isinstance(
        user.get("zero_optimization", {}), dict) else None
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"--deepspeed_config {path!r}: zero_optimization.stage must be "
                                   f"0, 1, 2 or 3, got {stage!r}")
    return user


def build_deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The ZeRO-knobs JSON plus the injected batch, precision and clipping; contradictions raise.
    ``cfg`` is only read (the resolved config holds the micro batch: loop.prepare)."""
    t, src = cfg.train, cfg.train.deepspeed_config or "<default>"
    user = load_deepspeed_json(t.deepspeed_config)
    injected = {"train_batch_size": t.global_batch_size,
                "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
                "gradient_accumulation_steps": t.grad_accum,
                "gradient_clipping": float(cfg.optim.grad_clip)}
    for key, value in injected.items():
        if key in user and user[key] != "auto" and user[key] != value:
            raise DeepSpeedConfigError(
                f"{src}: {key} = {user[key]!r} contradicts the command line ({_FLAG_FOR_KEY[key]} "
                f"gives {value!r}); remove {key!r} from the JSON: it holds ZeRO knobs only")
    for key in ("optimizer", "scheduler", "amp"):
        if key in user:
            raise DeepSpeedConfigError(
                f"{src}: remove the {key!r} block; the optimizer is DiT's AdamW from --lr, the "
                "learning rate is constant and precision comes from --precision")
    out = {k: v for k, v in user.items() if k not in _PRECISION_BLOCKS}
    out.update(injected)
    out.update(_precision_blocks(user, t.precision, src))
    out.setdefault("steps_per_print", 2**31 - 1)  # our own log line replaces DeepSpeed's
    out.setdefault("wall_clock_breakdown", False)
    out.setdefault("zero_optimization", {"stage": 0})
    return out


def _precision_blocks(user: dict, precision: str, src: str) -> dict:
    for key, mode in _PRECISION_BLOCKS.items():
        enabled = user.get(key, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (precision == mode):
            raise DeepSpeedConfigError(
                f"{src}: {key}.enabled = {enabled!r} contradicts --precision {precision}; remove the "
                f"{key!r} block's 'enabled' (precision comes from --precision)")
    fp16 = dict(user.get("fp16", {}))
    if fp16.get("loss_scale", 0) not in (0, "auto"):
        raise DeepSpeedConfigError(f"{src}: fp16.loss_scale = {fp16['loss_scale']!r}; fp16 training "
                                   "uses dynamic loss scaling (loss_scale 0)")
    bf16 = {k: v for k, v in user.get("bf16", user.get("bfloat16", {})).items() if k != "enabled"}
    fp16.pop("enabled", None)
    fp16.update(loss_scale=0)
    return {"bf16": {**bf16, "enabled": precision == "bf16"},
            "fp16": {"initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1, **fp16, "enabled": precision == "fp16"}}


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict) -> bool:
    off = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


# ---------------------------------------------------------------- model, optimizer, engine

def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each block in place (parameter names unchanged: no _orig_mod. prefix)."""
    for block in model.blocks:
        block.compile()


def build_optimizer(model: torch.nn.Module, cfg: Config, ds_config: dict, device: torch.device):
    """DiT's AdamW (constant lr, no weight decay by default), fused; DeepSpeedCPUAdam when offloading."""
    o = cfg.optim
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay, adamw_mode=True)
    # One kernel over all parameters where torch has it (CUDA, CPU): 7 passes over P instead of the
    # foreach default's 18; same update up to fp32 rounding.
    kind = {"fused": True} if fused_adamw_supported(device) else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                             weight_decay=o.weight_decay, **kind)


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for this device type."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return torch.device(device).type in _get_fused_kernels_supported_devices()


def engine_dtype(precision: str) -> torch.dtype:
    """The dtype of the engine's working weights (and of the model's inputs) for --precision."""
    return PRECISION_DTYPES[precision]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_engine(cfg: Config, ds_config: dict, device: torch.device, rank: int, world: int,
                 init_on_device: bool = False, init_plan=None):
    """Model -> activation checkpointing (constructor flag) -> compile -> EMA copy -> engine.

    ``init_on_device``: build the weights on ``device`` directly (seconds instead of tens of seconds for
    DiT-XL/2 on a GPU; the benchmark table's choice). The initial values then come from the device's
    RNG, not DiT's CPU initialisation, so train.py keeps the default.
    ``init_plan``: --init-from's weights (dit_fast.checkpoint.init_from), copied into the new model
    before the EMA copy and the optimizer exist, so both start from them.
    """
    import deepspeed
    if device.type == "cuda":  # DiT's train.py: TF32 matmuls and convolutions for the fp32 work
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Every rank builds the same initial weights (DiT's DDP broadcast of rank 0's init, whose
    # seed is global_seed * world_size); ZeRO-3 partitions these local copies without a broadcast.
    seed_everything(cfg.train.global_seed * world)
    with torch.device(device) if init_on_device else contextlib.nullcontext():
        model = build_model(cfg.model)
    if init_plan is not None:
        from ..checkpoint.init_from import apply_init_plan
        apply_init_plan(model, init_plan)
    ema = EMA(model, cfg.train.ema_decay, keep=rank == 0, device=device)
    if cfg.train.compile:
        apply_compile(model)
    model.to(device)  # DeepSpeed would move it too; the optimizer is built on the device
    optimizer = build_optimizer(model, cfg, ds_config, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ema
