"""One DiT training step as DiT's train.py does it, with the table's switches, and its measurement.

step = [VAE encode of the image batch, unless features are pre-extracted] -> diffusion.training_losses
(random t, labels) -> backward -> AdamW(lr 1e-4, wd 0) -> zero_grad -> EMA update (fp32, decay 0.9999).
Switches: gradient checkpointing, mixed precision (bf16 autocast on the model forward, as accelerate
wraps fast-DiT's model; or fp16 with a GradScaler), feature pre-extraction, attention / adaLN backend,
torch.compile, DeepSpeed ZeRO-2 (one process).

Memory: on CUDA torch.cuda.max_memory_allocated (and reserved) after reset_peak_memory_stats, taken
before the row's model is built. On a CPU there is no allocator statistic, so ``LiveBytes`` counts it:
every tensor of the row's state at the start of a step (weights, Adam state, EMA, VAE, data) plus
every storage an aten op creates during one extra step, released when its storage dies; the peak of
that sum is deterministic (bytes, not timing) and sees checkpointing's recomputation.
"""
from __future__ import annotations

import copy
import gc
import time
import types
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

EMA_DECAY = 0.9999
LR = 1e-4


@dataclass
class RowConfig:
    """The switches of one table row."""
    key: str
    label: str
    grad_ckpt: bool = False
    mixed_precision: bool = False
    pre_extracted: bool = False
    attn_backend: str = "math"
    fused_adaln: bool = False
    compile: bool = False
    zero_stage: int = 0


@dataclass
class BenchSetup:
    """What every row shares: the model builder, batch, shapes, VAE builder and device."""
    build_model: object            # (**kwargs) -> DiT
    batch: int
    image_size: int
    latent_size: int
    build_vae: object              # () -> dit_fast.vae.VAE (random weights)
    device: torch.device
    mp_dtype: torch.dtype = torch.bfloat16
    compile_mode: str = "block"    # "block": each DiT block compiled; "model": torch.compile(model)
    num_classes: int = 1000
    seed: int = 0


@dataclass
class TrainState:
    step_fn: object
    objects: list = field(default_factory=list)  # everything to free after the row


# ------------------------------------------------------------------------------------- building

def _autocast_forward(model, device_type: str, dtype: torch.dtype, enabled: bool):
    """The model forward under autocast, output back in fp32 (what accelerate's prepare() does)."""
    def forward(x, t, y):
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            out = model(x, t, y=y)
        return out.float()
    return forward


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float = EMA_DECAY) -> None:
    """ema = decay * ema + (1 - decay) * param for every parameter (DiT's update_ema, as one foreach)."""
    if all(p.dtype == e.dtype for p, e in zip(params, ema_params)):
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
        return
    for ema_p, p in zip(ema_params, params):  # half weights (DeepSpeed): upcast one tensor at a time
        ema_p.lerp_(p.detach().float(), 1.0 - decay)


def _deepspeed_engine(model, optimizer, row: RowConfig, setup: BenchSetup):
    """(engine, forward) for ZeRO stage ``row.zero_stage``; bf16/fp16 weights when mixed precision."""
    import deepspeed
    from dit_fast.distributed import init_distributed
    init_distributed(use_deepspeed=True)  # a world of one under plain python / pytest
    n_params = sum(p.numel() for p in model.parameters())
    config = {
        "train_batch_size": setup.batch, "train_micro_batch_size_per_gpu": setup.batch,
        "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
        # DeepSpeed's default buckets hold 5e8 elements; a smaller model would measure mostly empty bucket.
        "zero_optimization": {"stage": row.zero_stage, "reduce_bucket_size": min(n_params, int(5e8)),
                              "allgather_bucket_size": min(n_params, int(5e8))},
        "zero_allow_untested_optimizer": True,   # the client's torch AdamW (no JIT-built DeepSpeed ops)
    }
    dtype = torch.float32
    if row.mixed_precision:
        key = "bf16" if setup.mp_dtype == torch.bfloat16 else "fp16"
        config[key] = {"enabled": True}
        dtype = setup.mp_dtype
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def forward(x, t, y):  # DeepSpeed's half-precision weights need half-precision inputs
        return engine(x.to(dtype), t, y=y).float()
    return engine, forward


def _apply_compile(model, setup: BenchSetup):
    if setup.compile_mode == "model":
        return torch.compile(model)
    for block in model.blocks:  # per block: one small graph reused by every block, fast to compile
        block.compile()
    return model


def build_state(row: RowConfig, setup: BenchSetup) -> TrainState:
    """Fresh model, EMA, optimizer, diffusion and data for one row, and its step function."""
    from dit_fast.diffusion import create_diffusion
    device, n = setup.device, setup.batch
    torch.manual_seed(setup.seed)
    with device:
        model = setup.build_model(attn_backend=row.attn_backend, fused_adaln=row.fused_adaln,
                                  grad_checkpointing=1.0 if row.grad_ckpt else 0.0)
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0)
    diffusion = create_diffusion(timestep_respacing="")
    vae = None
    if not row.pre_extracted:
        with device:  # built in place: no copy, and diffusers' warning about .to() stays quiet
            vae = setup.build_vae()
    g = torch.Generator(device).manual_seed(setup.seed)
    if row.pre_extracted:  # (N, C, L, L) latents as read from a pre-extracted shard
        data = torch.randn(n, model.in_channels, setup.latent_size, setup.latent_size, device=device, generator=g)
    else:                  # (N, 3, H, W) images in [-1, 1]
        data = torch.rand(n, 3, setup.image_size, setup.image_size, device=device, generator=g) * 2 - 1
    labels = torch.randint(0, setup.num_classes, (n,), device=device, generator=g)

    engine = scaler = None
    if row.compile:
        model = _apply_compile(model, setup)
    if row.zero_stage:
        engine, forward = _deepspeed_engine(model, optimizer, row, setup)
        params = list(engine.module.parameters())
    else:
        forward = _autocast_forward(model, device.type, setup.mp_dtype, row.mixed_precision)
        if row.mixed_precision and setup.mp_dtype == torch.float16:
            scaler = torch.amp.GradScaler(device.type)

    def step() -> None:
        if vae is None:
            x = data
        else:
            x = vae.encode(data)                                   # (N, C, L, L), fp32, no grad
        t = torch.randint(0, diffusion.num_timesteps, (n,), device=device)
        loss = diffusion.training_losses(forward, x, t, dict(y=labels))["loss"].mean()
        if engine is not None:
            engine.backward(loss)
            engine.step()
        elif scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        update_ema(ema_params, params)

    return TrainState(step, [model, ema, optimizer, vae, data, labels, diffusion, engine, scaler])


def free_state(state: TrainState | None) -> None:
    """Drop every reference of a row and give the memory back (fresh state for the next row)."""
    if state is not None:
        engine = next((o for o in state.objects if hasattr(o, "destroy") and hasattr(o, "module")), None)
        if engine is not None:
            engine.destroy()
        state.objects.clear()
        state.step_fn = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()
    except Exception:  # compile never used, or an older torch
        pass


# ------------------------------------------------------------------------------------- memory on CPU

class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: those alive at the start plus every storage aten ops create.

    Each storage is counted once (views and in-place results share it) and removed when it is freed
    (a weakref on the storage). Deterministic: it counts bytes, it does not sample an allocator.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def add_state(self, objects) -> int:
        """Count every tensor reachable from ``objects`` (the row's state); returns the bytes counted.

        Walked explicitly, not via gc: torch keeps global caches (inductor's benchmark buffers, ...)
        that are not the training state and would make rows after a compiled one look bigger.
        """
        for tensor in reachable_tensors(objects):
            self.add(tensor)
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out


_LEAF_TYPES = (str, bytes, int, float, bool, complex, type(None), torch.device, torch.dtype, types.ModuleType,
               types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)


def reachable_tensors(objects, max_depth: int = 8):
    """Tensors reachable from ``objects`` through attributes, dicts, lists and tuples (each once)."""
    seen: set[int] = set()
    stack = [(obj, 0) for obj in objects]
    while stack:
        obj, depth = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAF_TYPES) or depth > max_depth:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
            if obj.grad is not None:
                yield obj.grad
            continue
        if isinstance(obj, dict):
            children = list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        else:
            children = list(getattr(obj, "__dict__", {}).values())
        stack.extend((child, depth + 1) for child in children)


def cpu_step_memory(state: TrainState) -> dict:
    """Run one step under LiveBytes: {'peak_bytes', 'start_bytes'} (see the module docstring)."""
    tracker = LiveBytes()
    start = tracker.add_state(state.objects)
    with tracker:
        state.step_fn()
    return {"peak_bytes": tracker.peak, "start_bytes": start}


# ------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(state: TrainState, device: torch.device, steps: int, warmup: int) -> dict:
    """Warm up, then time ``steps`` steps (synchronised, perf_counter); memory as described above."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        state.step_fn()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state.step_fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    result = {"step_times_s": times, "mean_step_s": sum(times) / len(times),
              "median_step_s": sorted(times)[len(times) // 2], "warmup_s": warmup_s}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["memory_method"] = "torch.cuda.max_memory_allocated"
    else:
        result.update(cpu_step_memory(state))
        result["memory_method"] = "live tensor bytes (state at step start + TorchDispatchMode over one step)"
    return result
