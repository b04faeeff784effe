"""A table row through the trainer's own step: the train.py flags of the row -> Config -> the engine
``dit_fast.train.engine.build_engine`` builds (DeepSpeed, fused AdamW, the fp32 EMA of the master
weights) -> ``dit_fast.train.step.TrainStep.optimizer_step``, timed. No second copy of the step here.

Data are synthetic and resident on the device: latents (N, C, L, L) for the pre-extracted-features
rows, images (N, 3, H, W) in [-1, 1] (encoded by the row's VAE inside the step) for the others; no
data loading is timed.

Memory: on CUDA torch.cuda.max_memory_allocated and max_memory_reserved after reset_peak_memory_stats,
taken before the row's model is built. On a CPU there is no allocator statistic, so ``LiveBytes`` counts
it: every tensor of the row's state at the start of a step (weights, master weights, AdamW state, EMA,
VAE, data) plus every storage an aten op creates during one extra step, released when its storage dies;
the peak of that sum is deterministic (bytes, not timing) and sees checkpointing's recomputation.
"""
from __future__ import annotations

import gc
import itertools
import time
import types
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class RowConfig:
    """One table row: the train.py flags it runs with (beyond the shared model/batch/data flags)."""
    key: str
    label: str
    flags: tuple = ()
    pre_extracted: bool = True     # --features-path (latents) or --data-path (VAE on the fly)
    tiny_patch: int = 2            # the tiny CPU model's patch (REPA's token grid needs 8 on the tiny VAE)


@dataclass
class TrainState:
    step_fn: object
    objects: list = field(default_factory=list)  # everything to free after the row
    encoder_call: object = None    # REPA rows: the frozen encoder's forward on the row's batch
    encoder: object = None


def build_state(cfg, vae_builder, data_shape: tuple, num_classes: int, seed: int = 0) -> TrainState:
    """The row's trainer (engine, EMA, step) from a resolved Config, with synthetic resident data."""
    from dit_fast.distributed import init_distributed
    from dit_fast.train.engine import build_deepspeed_config, build_engine
    from dit_fast.train.step import TrainStep
    ctx = init_distributed(use_deepspeed=True)  # a world of one under plain python / pytest
    device = ctx.device
    ds_config = build_deepspeed_config(cfg, 1)
    # Weights built on the GPU: a CPU init of DiT-XL/2 takes longer than the row (values do not matter)
    engine, ema = build_engine(cfg, ds_config, device, 0, 1, init_on_device=device.type == "cuda")
    vae = None
    if cfg.data.data_path is not None:
        with device:  # built in place: no copy, and diffusers' warning about .to() stays quiet
            vae = vae_builder()
    step = TrainStep.from_config(cfg, engine, ema, device, vae)
    engine.train()
    g = torch.Generator(device).manual_seed(seed)
    n = cfg.train.global_batch_size
    data = torch.randn(n, *data_shape, device=device, generator=g)
    if vae is not None:
        data = data.clamp_(-1, 1)  # images in [-1, 1]
    labels = torch.randint(0, num_classes, (n,), device=device, generator=g)
    from dit_fast.train.objective import needs_images
    if not needs_images(cfg):
        batches = itertools.repeat((data, labels))
        return TrainState(lambda: step.optimizer_step(batches), [engine, ema, vae, data, labels, step])
    side = cfg.model.image_size   # REPA: the uint8 images beside the latents, resident too
    images = torch.randint(0, 256, (n, 3, side, side), device=device, generator=g).to(torch.uint8)
    batches = itertools.repeat((data, labels, images))
    encoder = step.objective.encoder.to(device)
    return TrainState(lambda: step.optimizer_step(batches), [engine, ema, vae, data, labels, step, images],
                      encoder_call=lambda: encoder(images), encoder=encoder)


def free_state(state: TrainState | None) -> None:
    """Drop every reference of a row and give the memory back (fresh state for the next row)."""
    if state is not None:
        engine = state.objects[0] if state.objects else None
        if engine is not None and hasattr(engine, "destroy"):
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
        loss = state.step_fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    result = {"step_times_s": times, "mean_step_s": sum(times) / len(times),
              "median_step_s": sorted(times)[len(times) // 2], "warmup_s": warmup_s,
              "last_loss": float(loss)}  # a row that trains to NaN/inf shows here
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["memory_method"] = "torch.cuda.max_memory_allocated"
    else:
        result.update(cpu_step_memory(state))
        result["memory_method"] = "live tensor bytes (state at step start + TorchDispatchMode over one step)"
    return result
