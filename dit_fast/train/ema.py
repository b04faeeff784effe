"""The fp32 EMA of the weights (DiT's update_ema), following the fp32 MASTER weights.

Under --precision bf16/fp16 the engine's module holds rounded working weights; DiT's EMA is the fp32
average of the fp32 weights the optimizer updates. An EMA of the rounded copy would, near convergence,
collapse onto bf16-rounded values (an update smaller than half a bf16 ulp never shows in the copy), so
``master_weights`` reads the optimizer's fp32 master, wherever DeepSpeed keeps it:

- ZeRO-0, bf16/fp16: the wrapper's per-parameter fp32 copies (``fp16_groups`` <-> ``fp32_groups``, or
  the flat ``fp32_groups_flat`` of the fused fp16 optimizer), read in place;
- ZeRO-1/2 (and the BF16 optimizer): the fp32 partition behind ``param._hp_mapping``; read in place
  when one rank holds all of it, else assembled by ``deepspeed.utils.safe_get_full_fp32_param``
  (an all-reduce over the data-parallel group: every rank must take part);
- ZeRO-3: ``safe_get_full_fp32_param`` (an all-gather of the fp32 partitions: every rank takes part);
- --precision fp32: the weights themselves are the master.

Frozen parameters (pos_embed, not optimized) are constant: their EMA stays the fp32 initial value.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    """fp32 exponential moving average of the fp32 master weights, held by rank 0 only.

    Only rank 0 writes it to disk, so the other ranks save the memory (2.7 GB for DiT-XL/2); under
    ZeRO-3, and ZeRO-1/2 on several ranks, every rank still joins ``update`` (the master weights are
    assembled by collectives).
    """

    def __init__(self, model: torch.nn.Module, decay: float, keep: bool, device: torch.device):
        self.decay = decay
        self.model = copy.deepcopy(model).to(device).float().requires_grad_(False).eval() \
            if keep else None

    @torch.no_grad()
    def update(self, source, decay: float | None = None) -> None:
        """ema = decay * ema + (1 - decay) * master, per trainable parameter (DiT's update_ema).

        ``source``: a DeepSpeed engine (its fp32 master weights) or a plain module (its weights).
        """
        decay = self.decay if decay is None else decay
        ema_params = dict(self.model.named_parameters()) if self.model is not None else None
        for chunk in _chunks(master_weights(source)):
            if ema_params is None:
                continue  # not the EMA's rank; the collectives above still ran
            ema = [ema_params[name] for name, _ in chunk]
            src = [w.to(e.device, torch.float32) for (_, w), e in zip(chunk, ema)]
            torch._foreach_mul_(ema, decay)  # DiT's mul_(decay).add_(w, alpha=1 - decay), bit for bit
            torch._foreach_add_(ema, src, alpha=1 - decay)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import load_into_model
        load_into_model(self.model, state)


def master_weights(source):
    """Yield (name, fp32 master tensor) for every trainable parameter of an engine or a module.

    Collective under ZeRO-3 and multi-rank ZeRO-1/2: every rank must consume the whole generator.
    """
    module = getattr(source, "module", source)
    local = _wrapper_masters(getattr(source, "optimizer", None))
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in local:
            yield name, local[id(param)]
        elif hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            yield name, _partitioned_master(param)
        elif param.dtype == torch.float32:
            yield name, param.detach()
        else:
            raise RuntimeError(f"no fp32 master weight found for {name!r} ({param.dtype}) in optimizer "
                               f"{type(getattr(source, 'optimizer', None)).__name__}; the EMA would "
                               "average rounded weights")


def _wrapper_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(working param) -> its fp32 master, for DeepSpeed's ZeRO-0 fp16/bf16 optimizer wrappers."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    if hasattr(optimizer, "fp32_groups"):            # FP16_UnfusedOptimizer: one fp32 copy per param
        pairs = [zip(g, m) for g, m in zip(groups, optimizer.fp32_groups)]
    elif hasattr(optimizer, "fp32_groups_flat"):     # FP16_Optimizer: one flat fp32 buffer per group
        from torch._utils import _unflatten_dense_tensors
        pairs = [zip(g, _unflatten_dense_tensors(flat, g)) for g, flat in zip(groups, optimizer.fp32_groups_flat)]
    else:
        return {}
    return {id(p): m.detach() for pair in pairs for p, m in pair}


def _partitioned_master(param) -> torch.Tensor:
    mapping = getattr(param, "_hp_mapping", None)
    if not hasattr(param, "ds_id") and mapping is not None and mapping.lp_fragment_address.numel == param.numel():
        import torch.distributed as dist
        if dist.get_world_size(group=param._dp_group) == 1:  # the whole fp32 param is here: read in place
            return mapping.get_hp_fragment().view(param.shape)
    from deepspeed.utils import safe_get_full_fp32_param
    master = safe_get_full_fp32_param(param)
    if master is None:
        raise RuntimeError("DeepSpeed returned no fp32 master for a trainable parameter")
    return master


def _chunks(named):
    """Group (name, tensor) pairs by top-level child (one DiT block at a time, also inside a wrapper's
    ``dit.``), for one foreach each."""
    chunk, head = [], None
    for name, tensor in named:
        parts = name.split(".")
        at = parts.index("blocks") if "blocks" in parts[:2] else -1
        key = ".".join(parts[:at + 2]) if at >= 0 else ".".join(parts[:2 if parts[0] == "dit" else 1])
        if chunk and key != head:
            yield chunk
            chunk = []
        head = key
        chunk.append((name, tensor))
    if chunk:
        yield chunk
