"""The one place that picks a backend for attention and for the adaLN elementwise ops.

Attention backends: ``sdpa`` (default; PyTorch picks flash / cuDNN / memory-efficient / math itself),
``math`` (the original DiT formula, the reference), ``triton`` (our flash attention,
dit_fast_kernels.flash_attention), ``flash_attn`` (the flash-attn package), ``xformers``, and ``auto``.
adaLN backends: ``torch`` (separate LayerNorm / modulate / residual ops, as the original) or ``triton``
(fused kernels from dit_fast_kernels).

A backend asked for by name and unavailable raises, saying what to install or which hardware it needs.
``auto`` picks by our own measurements (``MEASURED``, benchmarks/results/2026-11-26-h200-run2/
kernels.json) and logs the choice once: attention -> ``sdpa`` (PyTorch dispatches to cuDNN on sm90,
faster than our Triton kernel forward and backward); adaLN -> ``torch`` under torch.compile (inductor's
fusion beat the fused ops' backward through autograd) and ``triton`` in eager CUDA code (the fused
forward beat eager and compile). Resolution happens at
call time (the device is known only then) and is pure Python, so torch.compile folds it away.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger("dit_fast")

ATTN_BACKENDS = ("auto", "sdpa", "math", "triton", "flash_attn", "xformers")
ADALN_BACKENDS = ("auto", "torch", "triton")
_logged: set[str] = set()
MEASURED = "benchmarks/results/2026-11-26-h200-run2/kernels.json"  # what the auto choices rest on


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def _triton_status(device: torch.device) -> tuple[bool, str]:
    try:
        from dit_fast_kernels import triton_status
    except ImportError as err:  # kernels/ not on the path: an incomplete install
        return False, f"dit_fast_kernels is not importable ({err}); install dit-fast with pip install -e ."
    return triton_status(device)


def _package_status(package: str, device: torch.device) -> tuple[bool, str]:
    if importlib.util.find_spec(package) is None:
        return False, f"the '{package}' package is not installed (pip install {package.replace('_', '-')})"
    if device.type != "cuda":
        return False, f"'{package}' needs a CUDA GPU, but the model runs on '{device.type}'"
    return True, "cuda"


def attn_backend_status(name: str, device) -> tuple[bool, str]:
    """(available, reason) for attention backend ``name`` on ``device``."""
    device = torch.device(device)
    if name in ("sdpa", "math"):
        return True, "built into PyTorch"
    if name == "triton":
        return _triton_status(device)
    if name in ("flash_attn", "xformers"):
        return _package_status(name, device)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTN_BACKENDS)}")


def check_attn_backend_name(name: str) -> str:
    """Validate a backend name early (at model construction), before any device is known."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTN_BACKENDS)}")
    return name


_TRUE_WORDS, _FALSE_WORDS = ("true", "1"), ("false", "0")


def adaln_backend_name(value) -> str:
    """The adaLN backend "torch" (the original's ops), "triton" (fused kernels) or "auto" for
    ``adaln_backend=`` -- and the one place its public alias ``fused_adaln`` (True / False / "auto",
    1 / 0, "true" / "false") is mapped: True -> "triton", False -> "torch". Anything else raises
    ValueError. (0 means off everywhere: ``0 in (True, False)`` holds, but ``0 is False`` does not.)
    """
    if isinstance(value, bool):
        return "triton" if value else "torch"
    if isinstance(value, int) and value in (0, 1):
        return "triton" if value else "torch"
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ADALN_BACKENDS:
            return word
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return "triton" if word in _TRUE_WORDS else "torch"
    raise ValueError(f"adaln_backend must be 'torch', 'triton' or 'auto' (its alias fused_adaln must be True, "
                     f"False or 'auto', or 1 / 0, 'true' / 'false'), got {value!r}")


def check_backends(attn_backend: str, adaln_backend, device) -> None:
    """An unknown or unavailable --attn-backend / --adaln-backend on ``device`` is a ValueError (bad
    input, one line), raised before a command writes anything."""
    try:
        resolve_attn_backend(attn_backend, device)
        resolve_adaln_backend(adaln_backend, device)
    except RuntimeError as err:  # "asked for but unavailable"
        raise ValueError(str(err)) from err


def resolve_attn_backend(name: str, device) -> str:
    """The concrete attention backend for ``name`` on ``device``; raises if asked for and unavailable."""
    key = ("attn", name, torch.device(device).type, os.environ.get("TRITON_INTERPRET", "0"))
    return _cached(key, _resolve_attn)


def resolve_adaln_backend(backend, device) -> str:
    """'triton' or 'torch' for the adaLN ops of ``adaln_backend`` (or its alias fused_adaln); raises if
    the Triton kernels were asked for and can't run.

    ``auto`` depends on whether the call is being traced by torch.compile (part of the cache key).
    """
    key = ("adaln", adaln_backend_name(backend), torch.device(device).type, os.environ.get("TRITON_INTERPRET", "0"),
           torch.compiler.is_compiling())
    return _cached(key, _resolve_adaln)


_resolved: dict[tuple, str] = {}


# torch.compile treats the result as a constant (resolution is a pure Python look-up: find_spec, the
# environment), so a compiled forward keeps no graph break; the cache spares eager forwards the look-ups.
@torch.compiler.assume_constant_result
def _cached(key: tuple, resolve) -> str:
    if key not in _resolved:
        _resolved[key] = resolve(*key[1:])
    return _resolved[key]


def _resolve_attn(name: str, device_type: str, interpret: str) -> str:
    device = torch.device(device_type)
    if name == "auto":
        why = "cuDNN SDPA beat our Triton attention fwd and fwd+bwd" if device_type == "cuda" else "CPU"
        _log_once(f"dit_fast: attention backend auto -> sdpa on {device_type} ({why}; {MEASURED})")
        return "sdpa"
    ok, reason = attn_backend_status(name, device)
    if not ok:
        raise RuntimeError(f"attention backend {name!r} was asked for but is unavailable: {reason}. "
                           f"Use attn_backend='sdpa' (or --attn-backend sdpa) instead.")
    return name


def _resolve_adaln(backend, device_type: str, interpret: str, compiling: bool = False) -> str:
    backend = adaln_backend_name(backend)
    if backend == "torch":
        return "torch"
    ok, reason = _triton_status(torch.device(device_type))
    if backend == "auto":
        if compiling:
            choice, why = "torch", "under torch.compile inductor's fusion beat the fused backward"
        else:
            choice = "triton" if ok and device_type == "cuda" else "torch"
            why = "eager: the fused forward beat eager and compile" if choice == "triton" else reason
        _log_once(f"dit_fast: fused adaLN auto -> {choice} on {device_type} ({why}; {MEASURED})")
        return choice
    if not ok:
        raise RuntimeError(f"adaln_backend='triton' (--fused-adaln) was asked for but the Triton kernels can't "
                           f"run: {reason}. Use adaln_backend='torch' (fused_adaln=False) instead.")
    return "triton"


# ---------------------------------------------------------------------------------------------
# Attention: q, k, v (B, H, T, d) -> (B, H, T, d)
# ---------------------------------------------------------------------------------------------

def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The original DiT (timm) formula: softmax(q k^T * d^-1/2) v. Softmax runs in fp32 for half inputs."""
    scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale                             # (B, H, T, T)
    attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype) if q.dtype != torch.float32 else attn.softmax(-1)
    return attn @ v                                                      # (B, H, T, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Non-causal scaled dot-product attention with the resolved ``backend``."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return attention_math(q, k, v)
    if backend == "triton":
        from dit_fast_kernels.flash_attention import flash_attention
        return flash_attention(q, k, v)
    if backend == "flash_attn":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("attention backend 'flash_attn' runs in fp16/bf16 only; use --precision bf16 "
                               "or attn_backend='sdpa' for fp32")
        from flash_attn import flash_attn_func  # (B, T, H, d) layout
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention  # (B, T, H, d) layout
        out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    raise ValueError(f"unresolved attention backend {backend!r}; call resolve_attn_backend first")


# ---------------------------------------------------------------------------------------------
# adaLN ops: x, y (N, T, D); shift, scale, gate (N, D)
# ---------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's modulate: x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def modulated_layer_norm(x, shift, scale, eps: float, backend: str, out_dtype=None) -> torch.Tensor:
    """modulate(LayerNorm(x, no affine, eps), shift, scale).

    ``out_dtype`` (Triton only): write the result in the dtype the next GEMM reads (autocast's), the
    same bits as autocast's own cast, without the separate cast kernels; the torch ops leave the cast
    to autocast.
    """
    if backend == "triton":
        from dit_fast_kernels.modulated_layer_norm import modulated_layer_norm as fused
        return fused(x, shift, scale, eps, out_dtype=out_dtype)
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


def gated_residual(x, gate, y, backend: str) -> torch.Tensor:
    """x + gate * y, the adaLN-Zero gated residual."""
    if backend == "triton":
        from dit_fast_kernels.gated_residual import gated_residual as fused
        return fused(x, gate, y)
    return x + gate.unsqueeze(1) * y


def gated_residual_norm(x, gate, y, shift, scale, eps: float, backend: str, out_dtype=None):
    """(h, m): h = x + gate * y and m = modulated_layer_norm(h, shift, scale), in one pass on Triton
    (m in ``out_dtype`` there, as in modulated_layer_norm)."""
    if backend == "triton":
        from dit_fast_kernels.gated_residual_norm import gated_residual_norm as fused
        return fused(x, gate, y, shift, scale, eps, out_dtype=out_dtype)
    h = x + gate.unsqueeze(1) * y
    return h, modulate(F.layer_norm(h, h.shape[-1:], eps=eps), shift, scale)


__all__ = [
    "ATTN_BACKENDS", "ADALN_BACKENDS", "attn_backend_status", "check_attn_backend_name", "adaln_backend_name",
    "resolve_attn_backend", "resolve_adaln_backend", "attention", "attention_math", "modulate",
    "modulated_layer_norm", "gated_residual", "gated_residual_norm",
]
