"""adaLN-Zero gated residual ``x + gate * y``, forward and backward.

In a DiT block every sublayer ends with ``x = x + gate * sublayer(...)``. Where the next sublayer
starts with a modulated LayerNorm, gated_residual_norm.py fuses the two; this op is the plain residual
(the block's last one). This module also holds what gated_residual_norm.py shares with it: the
reference (``gated_residual_ref``, ``residual_dtype``), ``kernels_run_on``, ``_prepare`` and the input
check ``_check_residual``.

Anatomy (the same in every op file): reference -> Triton kernels -> launchers -> ops (``dit_fast::``) with fake and
autograd registrations -> public function. Grid and tiling are those of modulated_layer_norm.py:
a program owns consecutive tokens of one sample (gate loaded once per program); the backward's
per-sample reduction dgate goes through per-(sample, chunk) fp32 partial sums reduced by torch, so the
backward is deterministic. The ops are ``triton_op``s.
"""
import torch
from torch.library import wrap_triton

from dit_fast_kernels.adaln_tiles import (
    BACKWARD_RESIDUAL_TILES, adaln_op, check_launchable, check_modulation, check_tokens, jit,
    last_dim_contiguous, launch_config, load_tile, load_vector, store_partial_sum, store_tile, tl, traced,
    use_triton,
)


def kernels_run_on(x) -> bool:
    """As modulated_layer_norm.kernels_run_on (a traced CPU op takes the reference), with this
    module's ``use_triton`` (the tests patch it; gated_residual_norm.py's ops call this function too)."""
    return use_triton(x.device) and not (x.device.type == "cpu" and traced(x))


# ---------------------------------------------------------------------------------------------
# Reference (readable torch, fp32 upcast)
# ---------------------------------------------------------------------------------------------

def residual_dtype(x, gate, y):
    """dtype of x + gate * y under torch's type promotion."""
    return torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))


def gated_residual_ref(x, gate, y, upcast=True):
    """x + gate[:, None] * y in the promoted dtype; ``upcast=False`` computes in the input dtypes."""
    dtype = residual_dtype(x, gate, y)
    if upcast:  # to fp32, or keep float64 (the tests' gold)
        wide = torch.promote_types(dtype, torch.float32)
        x, gate, y = x.to(wide), gate.to(wide), y.to(wide)
    return (x + gate[:, None] * y).to(dtype)


def _residual_backward_ref(dh, gate, y):
    """(dy, dgate) for h = x + gate * y (dx is dh itself)."""
    dhf = dh.float()
    return (dhf * gate.float()[:, None]).to(y.dtype), (dhf * y.float()).sum(1).to(gate.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels (rows held as column blocks A and B, as in modulated_layer_norm.py)
# ---------------------------------------------------------------------------------------------

@jit
def _residual_fwd_kernel(
    X,  # (N, T, D) strides (stride_xn, stride_xt, 1)
    GATE,  # (N, D) strides (stride_gate, 1)
    Y,  # (N, T, D) strides (stride_yn, stride_yt, 1)
    H,  # (N, T, D) contiguous, promoted dtype
    T, D, rows_per_program,
    stride_xn, stride_xt, stride_gate, stride_yn, stride_yt,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    t_start = tl.program_id(0) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    gate_a, gate_b = load_vector(GATE, n * stride_gate, ca, D), load_vector(GATE, n * stride_gate, cb, D)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask_a = (rows < t_end)[:, None]
        mask_b = mask_a & (cb < D)[None, :]
        x_rows, y_rows, h_rows = n * stride_xn + rows * stride_xt, n * stride_yn + rows * stride_yt, (n * T + rows) * D
        h_a = load_tile(X, x_rows, ca, mask_a) + gate_a[None, :] * load_tile(Y, y_rows, ca, mask_a)
        h_b = load_tile(X, x_rows, cb, mask_b) + gate_b[None, :] * load_tile(Y, y_rows, cb, mask_b)
        store_tile(H, h_rows, ca, h_a, mask_a)
        store_tile(H, h_rows, cb, h_b, mask_b)


@jit
def _residual_bwd_kernel(
    DH,  # (N, T, D) strides (stride_dn, stride_dt, 1)
    GATE,  # (N, D) strides (stride_gate, 1)
    Y,  # (N, T, D) strides (stride_yn, stride_yt, 1)
    DY,  # (N, T, D) contiguous, y's dtype
    DGATE_PART,  # (N, n_chunks, D) fp32 partial sums over this program's rows
    T, D, rows_per_program, n_chunks,
    stride_dn, stride_dt, stride_gate, stride_yn, stride_yt,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(0)
    t_start = chunk * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    gate_a, gate_b = load_vector(GATE, n * stride_gate, ca, D), load_vector(GATE, n * stride_gate, cb, D)
    acc_gate_a = tl.zeros((BLOCK_T, BLOCK_A), dtype=tl.float32)
    acc_gate_b = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask_a = (rows < t_end)[:, None]
        mask_b = mask_a & (cb < D)[None, :]
        d_rows, y_rows = n * stride_dn + rows * stride_dt, n * stride_yn + rows * stride_yt
        dh_a, dh_b = load_tile(DH, d_rows, ca, mask_a), load_tile(DH, d_rows, cb, mask_b)
        store_tile(DY, (n * T + rows) * D, ca, dh_a * gate_a[None, :], mask_a)
        store_tile(DY, (n * T + rows) * D, cb, dh_b * gate_b[None, :], mask_b)
        acc_gate_a += dh_a * load_tile(Y, y_rows, ca, mask_a)
        acc_gate_b += dh_b * load_tile(Y, y_rows, cb, mask_b)
    part = (n * n_chunks + chunk) * D
    store_partial_sum(DGATE_PART, part, ca, acc_gate_a, D)
    store_partial_sum(DGATE_PART, part, cb, acc_gate_b, D)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _prepare(*tensors):
    return [last_dim_contiguous(t) for t in tensors]


def gated_residual_fwd(x, gate, y, **config_overrides):
    """Triton forward: h (N, T, D) in the promoted dtype."""
    check_launchable(x.device)
    x, gate, y = _prepare(x, gate, y)
    N, T, D = x.shape
    cfg = launch_config(N, T, D, **config_overrides)
    h = torch.empty((N, T, D), dtype=residual_dtype(x, gate, y), device=x.device)
    (wrap_triton(_residual_fwd_kernel) if traced(x) else _residual_fwd_kernel)[(cfg.n_chunks, N)](
        x, gate, y, h, T, D, cfg.rows_per_program,
        x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return h


def gated_residual_bwd(dh, gate, y, **config_overrides):
    """Triton backward: (dy y.dtype, dgate gate.dtype); deterministic (no atomics)."""
    check_launchable(y.device)
    dh, gate, y = _prepare(dh, gate, y)
    N, T, D = y.shape
    cfg = launch_config(N, T, D, **{**BACKWARD_RESIDUAL_TILES, **config_overrides})
    dy = torch.empty((N, T, D), dtype=y.dtype, device=y.device)
    dgate_part = torch.empty((N, cfg.n_chunks, D), dtype=torch.float32, device=y.device)
    (wrap_triton(_residual_bwd_kernel) if traced(y) else _residual_bwd_kernel)[(cfg.n_chunks, N)](
        dh, gate, y, dy, dgate_part, T, D, cfg.rows_per_program, cfg.n_chunks,
        dh.stride(0), dh.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return dy, dgate_part.sum(1).to(gate.dtype)


# ---------------------------------------------------------------------------------------------
# Ops: triton_ops with explicit fakes and autograd (see modulated_layer_norm.py)
# ---------------------------------------------------------------------------------------------

@adaln_op("dit_fast::gated_residual")
def _residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kernels_run_on(x):
        return gated_residual_fwd(x, gate, y)
    return gated_residual_ref(x, gate, y)


@_residual_op.register_fake
def _(x, gate, y):
    return torch.empty(x.shape, dtype=residual_dtype(x, gate, y), device=x.device)


@adaln_op("dit_fast::gated_residual_backward")
def _residual_backward_op(dh: torch.Tensor, gate: torch.Tensor,
                          y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if kernels_run_on(y):
        return gated_residual_bwd(dh, gate, y)
    return _residual_backward_ref(dh, gate, y)


@_residual_backward_op.register_fake
def _(dh, gate, y):
    return torch.empty_like(y, memory_format=torch.contiguous_format), gate.new_empty(gate.shape)


def _residual_setup_context(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _residual_backward(ctx, dh):
    gate, y = ctx.saved_tensors
    dy, dgate = _residual_backward_op(dh, gate, y)
    return dh.to(ctx.x_dtype), dgate, dy


_residual_op.register_autograd(_residual_backward, setup_context=_residual_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def _check_residual(x, gate, y):
    """The input check of both residual ops' public functions."""
    check_tokens("x", x)
    check_tokens("y", y)
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"y must match x's shape and device {tuple(x.shape)} on {x.device}, "
                         f"got {tuple(y.shape)} on {y.device}")
    check_modulation("gate", x, gate)


def gated_residual(x, gate, y):
    """adaLN-Zero's gated residual ``x + gate[:, None] * y`` in one pass.

    Args:
        x, y: (N, T, D) residual stream and sublayer output, fp32 / fp16 / bf16 (unit stride along D).
        gate: (N, D) per-sample gate, any float dtype (views such as chunks of (N, 6D) are fine).
    Returns:
        (N, T, D) in torch's promoted dtype of (x, gate, y). Differentiable w.r.t. all three; dgate is
        reduced over T deterministically. A ``dit_fast::gated_residual`` triton_op (no graph break).
    """
    _check_residual(x, gate, y)
    return _residual_op(x, gate, y)
