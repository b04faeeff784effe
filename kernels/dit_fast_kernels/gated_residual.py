"""adaLN-Zero gated residual ``x + gate * y``, and the same fused with the next modulated LayerNorm.

In a DiT block every sublayer ends with ``x = x + gate * sublayer(...)`` and the next sublayer starts
with ``modulate(LayerNorm(x), shift, scale)``. ``gated_residual_norm`` does both in one pass: it reads
x and y once and writes the new residual stream h and the next sublayer's input m.

Anatomy (the same in every op file): reference -> Triton kernels -> launchers -> custom ops (``dit_fast::``) with fake
and autograd registrations -> public functions. Grid and tiling are those of modulated_layer_norm.py:
a program owns consecutive tokens of one sample (gate/shift/scale loaded once per program); the
backward's per-sample reductions (dgate, dshift, dscale) go through per-(sample, chunk) fp32 partial
sums reduced by torch, so the backward is deterministic.

The fused op normalizes h as rounded to its storage dtype, so its m equals ``modulated_layer_norm(h)``
of the unfused path and the backward, which re-reads the stored h, is consistent with the forward.
"""
import torch

from dit_fast_kernels.modulated_layer_norm import (
    BACKWARD_RESIDUAL_TILES, centered_rows, check_launchable, check_modulation, check_tokens, jit,
    last_dim_contiguous, launch_config, load_tile, load_vector, modulated_layer_norm_ref, norm_input_grad,
    store_partial_sum, store_tile, tl, use_triton,
)


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


def gated_residual_norm_ref(x, gate, y, shift, scale, eps=1e-6, upcast=True):
    """(h, m) = (x + gate * y, modulated_layer_norm(h, shift, scale)); m is computed from h as stored."""
    h = gated_residual_ref(x, gate, y, upcast)
    return h, modulated_layer_norm_ref(h, shift, scale, eps, upcast)


def _residual_backward_ref(dh, gate, y):
    """(dy, dgate) for h = x + gate * y (dx is dh itself)."""
    dhf = dh.float()
    return (dhf * gate.float()[:, None]).to(y.dtype), (dhf * y.float()).sum(1).to(gate.dtype)


def _residual_norm_forward_ref(x, gate, y, shift, scale, eps):
    """(h, m, mean, rstd) like the Triton forward."""
    h = gated_residual_ref(x, gate, y)
    hf = h.float()
    mean = hf.mean(-1)
    rstd = torch.rsqrt((hf - mean[..., None]).pow(2).mean(-1) + eps)
    m = (hf - mean[..., None]) * rstd[..., None] * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return h, m.to(h.dtype), mean, rstd


def _residual_norm_backward_ref(dh, dm, h, gate, y, scale, mean, rstd):
    """(dx, dy, dgate, dshift, dscale); dh may be None (h unused downstream)."""
    hhat = (h.float() - mean[..., None]) * rstd[..., None]  # (N, T, D)
    dmf = dm.float()
    g = dmf * (1 + scale.float()[:, None])
    dh_total = rstd[..., None] * (g - g.mean(-1, keepdim=True) - hhat * (g * hhat).mean(-1, keepdim=True))
    if dh is not None:
        dh_total = dh_total + dh.float()
    dy = (dh_total * gate.float()[:, None]).to(y.dtype)
    dgate = (dh_total * y.float()).sum(1).to(gate.dtype)
    return (dh_total.to(h.dtype), dy, dgate, dmf.sum(1).to(scale.dtype),
            (dmf * hhat).sum(1).to(scale.dtype))


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


@jit
def _residual_norm_fwd_kernel(
    X,  # (N, T, D) strides (stride_xn, stride_xt, 1)
    GATE,  # (N, D) strides (stride_gate, 1)
    Y,  # (N, T, D) strides (stride_yn, stride_yt, 1)
    SHIFT,  # (N, D) strides (stride_shift, 1)
    SCALE,  # (N, D) strides (stride_scale, 1)
    H,  # (N, T, D) contiguous, promoted dtype
    M,  # (N, T, D) contiguous, h's dtype
    MEAN,  # (N, T) fp32 contiguous
    RSTD,  # (N, T) fp32 contiguous
    T, D, rows_per_program,
    stride_xn, stride_xt, stride_gate, stride_yn, stride_yt, stride_shift, stride_scale,
    eps,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    t_start = tl.program_id(0) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    gate_a, gate_b = load_vector(GATE, n * stride_gate, ca, D), load_vector(GATE, n * stride_gate, cb, D)
    shift_a, shift_b = load_vector(SHIFT, n * stride_shift, ca, D), load_vector(SHIFT, n * stride_shift, cb, D)
    scale1_a = 1.0 + load_vector(SCALE, n * stride_scale, ca, D)
    scale1_b = 1.0 + load_vector(SCALE, n * stride_scale, cb, D)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        mask_a = row_ok[:, None]
        mask_b = mask_a & (cb < D)[None, :]
        x_rows, y_rows, out_rows = n * stride_xn + rows * stride_xt, n * stride_yn + rows * stride_yt, n * T + rows
        # round h to its storage dtype before normalizing: m is then exactly the unfused path's
        h_a = load_tile(X, x_rows, ca, mask_a) + gate_a[None, :] * load_tile(Y, y_rows, ca, mask_a)
        h_b = load_tile(X, x_rows, cb, mask_b) + gate_b[None, :] * load_tile(Y, y_rows, cb, mask_b)
        h_a, h_b = h_a.to(H.dtype.element_ty), h_b.to(H.dtype.element_ty)
        store_tile(H, out_rows * D, ca, h_a, mask_a)
        store_tile(H, out_rows * D, cb, h_b, mask_b)
        hc_a, hc_b, mean, rstd = centered_rows(h_a.to(tl.float32), h_b.to(tl.float32), mask_b, D, eps)
        store_tile(M, out_rows * D, ca, hc_a * rstd[:, None] * scale1_a[None, :] + shift_a[None, :], mask_a)
        store_tile(M, out_rows * D, cb, hc_b * rstd[:, None] * scale1_b[None, :] + shift_b[None, :], mask_b)
        tl.store(MEAN + out_rows, mean, mask=row_ok)
        tl.store(RSTD + out_rows, rstd, mask=row_ok)


@jit
def _residual_norm_bwd_kernel(
    DH,  # (N, T, D) strides (stride_dhn, stride_dht, 1); unused unless HAS_DH
    DM,  # (N, T, D) strides (stride_dmn, stride_dmt, 1)
    H,  # (N, T, D) contiguous (saved output)
    GATE,  # (N, D) strides (stride_gate, 1)
    Y,  # (N, T, D) strides (stride_yn, stride_yt, 1)
    SCALE,  # (N, D) strides (stride_scale, 1)
    MEAN,  # (N, T) fp32 contiguous
    RSTD,  # (N, T) fp32 contiguous
    DX,  # (N, T, D) contiguous, h's dtype
    DY,  # (N, T, D) contiguous, y's dtype
    DGATE_PART,  # (N, n_chunks, D) fp32 partial sums over this program's rows
    DSHIFT_PART,  # (N, n_chunks, D) fp32
    DSCALE_PART,  # (N, n_chunks, D) fp32
    T, D, rows_per_program, n_chunks,
    stride_dhn, stride_dht, stride_dmn, stride_dmt, stride_gate, stride_yn, stride_yt, stride_scale,
    HAS_DH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(0)
    t_start = chunk * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    gate_a, gate_b = load_vector(GATE, n * stride_gate, ca, D), load_vector(GATE, n * stride_gate, cb, D)
    scale1_a = 1.0 + load_vector(SCALE, n * stride_scale, ca, D)
    scale1_b = 1.0 + load_vector(SCALE, n * stride_scale, cb, D)
    acc_gate_a = tl.zeros((BLOCK_T, BLOCK_A), dtype=tl.float32)
    acc_gate_b = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
    acc_shift_a, acc_scale_a = tl.zeros_like(acc_gate_a), tl.zeros_like(acc_gate_a)
    acc_shift_b, acc_scale_b = tl.zeros_like(acc_gate_b), tl.zeros_like(acc_gate_b)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        mask_a = row_ok[:, None]
        mask_b = mask_a & (cb < D)[None, :]
        mean = tl.load(MEAN + n * T + rows, mask=row_ok, other=0.0)[:, None]
        rstd = tl.load(RSTD + n * T + rows, mask=row_ok, other=0.0)
        out_rows = (n * T + rows) * D
        hhat_a = (load_tile(H, out_rows, ca, mask_a) - mean) * rstd[:, None]  # 0 in masked rows (rstd = 0)
        hhat_b = tl.where(mask_b, (load_tile(H, out_rows, cb, mask_b) - mean) * rstd[:, None], 0.0)
        m_rows = n * stride_dmn + rows * stride_dmt
        dm_a, dm_b = load_tile(DM, m_rows, ca, mask_a), load_tile(DM, m_rows, cb, mask_b)
        dh_a, dh_b = norm_input_grad(dm_a * scale1_a[None, :], dm_b * scale1_b[None, :], hhat_a, hhat_b, rstd, D)
        if HAS_DH:  # gradient reaching h directly (the residual stream), added to the norm's
            dh_rows = n * stride_dhn + rows * stride_dht
            dh_a += load_tile(DH, dh_rows, ca, mask_a)
            dh_b += load_tile(DH, dh_rows, cb, mask_b)
        store_tile(DX, out_rows, ca, dh_a, mask_a)
        store_tile(DX, out_rows, cb, dh_b, mask_b)
        store_tile(DY, out_rows, ca, dh_a * gate_a[None, :], mask_a)
        store_tile(DY, out_rows, cb, dh_b * gate_b[None, :], mask_b)
        y_rows = n * stride_yn + rows * stride_yt
        acc_gate_a += dh_a * load_tile(Y, y_rows, ca, mask_a)
        acc_gate_b += dh_b * load_tile(Y, y_rows, cb, mask_b)
        acc_shift_a += dm_a
        acc_shift_b += dm_b
        acc_scale_a += dm_a * hhat_a
        acc_scale_b += dm_b * hhat_b
    part = (n * n_chunks + chunk) * D
    store_partial_sum(DGATE_PART, part, ca, acc_gate_a, D)
    store_partial_sum(DGATE_PART, part, cb, acc_gate_b, D)
    store_partial_sum(DSHIFT_PART, part, ca, acc_shift_a, D)
    store_partial_sum(DSHIFT_PART, part, cb, acc_shift_b, D)
    store_partial_sum(DSCALE_PART, part, ca, acc_scale_a, D)
    store_partial_sum(DSCALE_PART, part, cb, acc_scale_b, D)


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
    _residual_fwd_kernel[(cfg.n_chunks, N)](
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
    _residual_bwd_kernel[(cfg.n_chunks, N)](
        dh, gate, y, dy, dgate_part, T, D, cfg.rows_per_program, cfg.n_chunks,
        dh.stride(0), dh.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return dy, dgate_part.sum(1).to(gate.dtype)


def gated_residual_norm_fwd(x, gate, y, shift, scale, eps, **config_overrides):
    """Triton forward: (h, m) in the promoted dtype, mean and rstd (N, T) fp32."""
    check_launchable(x.device)
    x, gate, y, shift, scale = _prepare(x, gate, y, shift, scale)
    N, T, D = x.shape
    cfg = launch_config(N, T, D, **config_overrides)
    h = torch.empty((N, T, D), dtype=residual_dtype(x, gate, y), device=x.device)
    m = torch.empty_like(h)
    mean = torch.empty((N, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _residual_norm_fwd_kernel[(cfg.n_chunks, N)](
        x, gate, y, shift, scale, h, m, mean, rstd, T, D, cfg.rows_per_program,
        x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1), shift.stride(0),
        scale.stride(0), eps,
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return h, m, mean, rstd


def gated_residual_norm_bwd(dh, dm, h, gate, y, scale, mean, rstd, **config_overrides):
    """Triton backward: (dx h.dtype, dy y.dtype, dgate gate.dtype, dshift, dscale scale.dtype)."""
    check_launchable(h.device)
    dm, gate, y, scale = _prepare(dm, gate, y, scale)
    h = h.contiguous()
    has_dh = dh is not None
    dh = last_dim_contiguous(dh) if has_dh else dm  # a placeholder pointer when absent
    N, T, D = h.shape
    cfg = launch_config(N, T, D, **{**BACKWARD_RESIDUAL_TILES, **config_overrides})
    dx = torch.empty((N, T, D), dtype=h.dtype, device=h.device)
    dy = torch.empty((N, T, D), dtype=y.dtype, device=h.device)
    dgate_part, dshift_part, dscale_part = (
        torch.empty((N, cfg.n_chunks, D), dtype=torch.float32, device=h.device) for _ in range(3))
    _residual_norm_bwd_kernel[(cfg.n_chunks, N)](
        dh, dm, h, gate, y, scale, mean, rstd, dx, dy, dgate_part, dshift_part, dscale_part,
        T, D, cfg.rows_per_program, cfg.n_chunks,
        dh.stride(0), dh.stride(1), dm.stride(0), dm.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        scale.stride(0),
        HAS_DH=has_dh, BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return (dx, dy, dgate_part.sum(1).to(gate.dtype), dshift_part.sum(1).to(scale.dtype),
            dscale_part.sum(1).to(scale.dtype))


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dit_fast::gated_residual", mutates_args=())
def _residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if use_triton(x.device):
        return gated_residual_fwd(x, gate, y)
    return gated_residual_ref(x, gate, y)


@_residual_op.register_fake
def _(x, gate, y):
    return torch.empty(x.shape, dtype=residual_dtype(x, gate, y), device=x.device)


@torch.library.custom_op("dit_fast::gated_residual_backward", mutates_args=())
def _residual_backward_op(dh: torch.Tensor, gate: torch.Tensor,
                          y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(y.device):
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


@torch.library.custom_op("dit_fast::gated_residual_norm", mutates_args=())
def _residual_norm_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                      scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    if use_triton(x.device):
        return gated_residual_norm_fwd(x, gate, y, shift, scale, eps)
    return _residual_norm_forward_ref(x, gate, y, shift, scale, eps)


@_residual_norm_op.register_fake
def _(x, gate, y, shift, scale, eps):
    N, T, D = x.shape
    h = torch.empty((N, T, D), dtype=residual_dtype(x, gate, y), device=x.device)
    stats = x.new_empty((N, T), dtype=torch.float32)
    return h, torch.empty_like(h), stats, torch.empty_like(stats)


@torch.library.custom_op("dit_fast::gated_residual_norm_backward", mutates_args=())
def _residual_norm_backward_op(
    dh: torch.Tensor | None, dm: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
    scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(h.device):
        return gated_residual_norm_bwd(dh, dm, h, gate, y, scale, mean, rstd)
    return _residual_norm_backward_ref(dh, dm, h, gate, y, scale, mean, rstd)


@_residual_norm_backward_op.register_fake
def _(dh, dm, h, gate, y, scale, mean, rstd):
    N, T, D = h.shape
    return (h.new_empty((N, T, D)), y.new_empty((N, T, D)), gate.new_empty((N, D)),
            scale.new_empty((N, D)), scale.new_empty((N, D)))


def _residual_norm_setup_context(ctx, inputs, output):
    x, gate, y, shift, scale, _ = inputs
    h, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, gate, y, scale, mean, rstd)
    ctx.x_dtype, ctx.shift_dtype = x.dtype, shift.dtype


def _residual_norm_backward(ctx, dh, dm, _dmean, _drstd):
    h, gate, y, scale, mean, rstd = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = _residual_norm_backward_op(dh, dm, h, gate, y, scale, mean, rstd)
    return dx.to(ctx.x_dtype), dgate, dy, dshift.to(ctx.shift_dtype), dscale, None


_residual_norm_op.register_autograd(_residual_norm_backward, setup_context=_residual_norm_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def _check_residual(x, gate, y):
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
        reduced over T deterministically. A ``dit_fast::gated_residual`` custom op (no graph break).
    """
    _check_residual(x, gate, y)
    return _residual_op(x, gate, y)


def gated_residual_norm(x, gate, y, shift, scale, eps=1e-6):
    """Gated residual and the next sublayer's modulated LayerNorm in one pass.

    Args:
        x, y: (N, T, D) residual stream and sublayer output, fp32 / fp16 / bf16.
        gate, shift, scale: (N, D) per-sample adaLN vectors, any float dtype (views are fine).
        eps: LayerNorm epsilon (DiT uses 1e-6).
    Returns:
        (h, m), both (N, T, D) in the promoted dtype of (x, gate, y): ``h = x + gate[:, None] * y`` and
        ``m = LayerNorm(h, no affine, eps) * (1 + scale[:, None]) + shift[:, None]`` (of h as stored,
        fp32 statistics). Gradients may flow into both h and m; the backward is deterministic.
    """
    _check_residual(x, gate, y)
    check_modulation("shift", x, shift)
    check_modulation("scale", x, scale)
    h, m, _, _ = _residual_norm_op(x, gate, y, shift, scale, float(eps))
    return h, m
