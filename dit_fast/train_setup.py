"""Everything the trainer builds before the first step: distributed init, the DeepSpeed config,
the model (checkpointing -> compile -> engine) and the EMA.

Checks that can fail on user input run before any step and raise ValueError / FileNotFoundError
with what was wrong and the flag or key to change.
"""
from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import torch

from .config import Config

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


# ---------------------------------------------------------------- distributed

def env_world() -> tuple[int, int, int]:
    """(global rank, world size, local rank) from the launcher's env; plain python = (0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uses_cuda() -> bool:
    """Whether DeepSpeed's accelerator is CUDA (DS_ACCELERATOR=cpu keeps a GPU machine on the CPU)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cuda" and torch.cuda.is_available()


def init_distributed() -> torch.device:
    """Join the process group (deepspeed / torchrun env, or a one-process group for plain python).

    DeepSpeed picks the backend of its accelerator: nccl on CUDA, gloo (or ccl) on CPU.
    """
    import deepspeed
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    _, _, local_rank = env_world()
    if uses_cuda():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ---------------------------------------------------------------- DeepSpeed config

def resolve_batch(cfg: Config, world_size: int) -> None:
    """Fill cfg.train.micro_batch_size; global batch must be micro x accumulation x world."""
    t = cfg.train
    per_step = world_size * t.grad_accum
    if t.global_batch_size % per_step:
        raise ValueError(
            f"--global-batch-size {t.global_batch_size} is not divisible by world size "
            f"{world_size} x --grad-accum {t.grad_accum} = {per_step}")
    t.micro_batch_size = t.global_batch_size // per_step


def load_deepspeed_json(path: str | None) -> dict:
    if not path:
        return {"zero_optimization": {"stage": 0}}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path!r} does not exist (see configs/deepspeed/)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"--deepspeed_config {path!r} is not valid JSON: {err}") from err


def build_deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The ZeRO-knobs JSON plus the injected batch, precision and clipping; contradictions raise."""
    resolve_batch(cfg, world_size)
    t, src = cfg.train, cfg.train.deepspeed_config or "<default>"
    user = load_deepspeed_json(t.deepspeed_config)
    injected = {"train_batch_size": t.global_batch_size,
                "train_micro_batch_size_per_gpu": t.micro_batch_size,
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

def build_model(cfg: Config) -> torch.nn.Module:
    """The single-device DiT from cfg.model (in_channels / input_size already resolved)."""
    from . import models
    m = cfg.model
    kwargs = dict(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                  learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob,
                  attn_backend=m.attn_backend, fused_adaln=m.fused_adaln,
                  grad_checkpointing=m.grad_checkpointing)
    return models.build_model(m.model, depth=m.depth, hidden_size=m.hidden_size, num_heads=m.num_heads, **kwargs)


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each block in place (parameter names unchanged: no _orig_mod. prefix)."""
    for block in model.blocks:
        block.compile()


def build_optimizer(model: torch.nn.Module, cfg: Config, ds_config: dict, device: torch.device):
    """DiT's AdamW (constant lr, no weight decay by default); DeepSpeedCPUAdam when offloading."""
    o = cfg.optim
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay, adamw_mode=True)
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                             weight_decay=o.weight_decay, **fused)


def engine_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


class EMA:
    """fp32 exponential moving average of the weights, held by rank 0 only.

    Only rank 0 writes it to disk, so the other ranks save the memory (2.7 GB for DiT-XL/2).
    Under ZeRO-3 every rank joins the per-module parameter gathers (a collective); under ZeRO-0/1/2
    the working weights are replicated, so the update is local and free of communication.
    The update reads the engine's working weights (bf16 under --precision bf16), upcast to fp32.
    """

    def __init__(self, model: torch.nn.Module, decay: float, keep: bool, device: torch.device):
        self.decay = decay
        self.model = copy.deepcopy(model).to(device).float().requires_grad_(False).eval() \
            if keep else None

    @torch.no_grad()
    def update(self, module: torch.nn.Module, zero3: bool, decay: float | None = None) -> None:
        """ema = decay * ema + (1 - decay) * param, per parameter (DiT's update_ema)."""
        decay = self.decay if decay is None else decay
        ema_params = dict(self.model.named_parameters()) if self.model is not None else None
        for chunk in _param_chunks(module):
            if zero3:
                import deepspeed
                with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
                    self._lerp(chunk, ema_params, decay)
            else:
                self._lerp(chunk, ema_params, decay)

    @staticmethod
    def _lerp(chunk, ema_params, decay: float) -> None:
        if ema_params is None:
            return
        ema = [ema_params[name] for name, _ in chunk]
        src = [p.detach().to(e.device, torch.float32) for (_, p), e in zip(chunk, ema)]
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, src, alpha=1 - decay)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        from .checkpoint import load_into_model
        load_into_model(self.model, state)


def _param_chunks(module: torch.nn.Module):
    """Parameters grouped by top-level child (one DiT block at a time under ZeRO-3)."""
    prefix_groups: dict[str, list] = {}
    for name, p in module.named_parameters():
        head = name.split(".")[0]
        if head == "blocks":
            head = ".".join(name.split(".")[:2])
        prefix_groups.setdefault(head, []).append((name, p))
    return list(prefix_groups.values())
