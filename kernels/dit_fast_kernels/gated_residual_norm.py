"""adaLN-Zero gated residual fused with the next modulated LayerNorm, forward and backward.

In a DiT block every sublayer ends with ``x = x + gate * sublayer(...)`` and the next sublayer starts
with ``modulate(LayerNorm(x), shift, scale)``. ``gated_residual_norm`` does both in one pass: it reads
x and y once and writes the new residual stream h and the next sublayer's input m.

Anatomy (the same in every op file): reference -> Triton kernels -> launchers -> ops (``dit_fast::``) with fake and
autograd registrations -> public function. The residual's reference, dtype rule, input check and
``kernels_run_on`` come from gated_residual.py (which does not import this module). Grid and tiling are
those of modulated_layer_norm.py: a program owns consecutive tokens of one sample (gate/shift/scale
loaded once per program); the backward's per-sample reductions (dgate, dshift, dscale) go through
per-(sample, chunk) fp32 partial sums reduced by torch, so the backward is deterministic.

The op normalizes h as rounded to its storage dtype, so its m equals ``modulated_layer_norm(h)`` of
the unfused path and the backward, which re-reads the stored h, is consistent with the forward.
As in modulated_layer_norm.py: m can be written in ``out_dtype`` (the autocast dtype: the next GEMM's
input, no separate cast; its gradient dm comes back in that dtype), the op has the "tiles" and "rows"
(a row per tile in as few warps as hold it, prefetch, 1-D accumulators) layouts, and both ops are
``triton_op``s.
"""
import torch
from torch.library import wrap_triton

from dit_fast_kernels.adaln_tiles import (
    BACKWARD_RESIDUAL_TILES, ROWS_RESIDUAL_BACKWARD, ROWS_RESIDUAL_FORWARD, adaln_op, centered_rows,
    check_launchable, check_layout, check_modulation, check_out_dtype, jit, last_dim_contiguous,
    layout_config, load_row_stats, load_rows, load_tile, load_vector, norm_input_grad, store_partial_sum,
    store_tile, store_vector, tl, traced,
)
from dit_fast_kernels.gated_residual import (
    _check_residual, _prepare, gated_residual_ref, kernels_run_on, residual_dtype,
)
from dit_fast_kernels.modulated_layer_norm import modulated_layer_norm_ref


# ---------------------------------------------------------------------------------------------
# Reference (readable torch, fp32 upcast)
# ---------------------------------------------------------------------------------------------

def gated_residual_norm_ref(x, gate, y, shift, scale, eps=1e-6, upcast=True, out_dtype=None):
    """(h, m) = (x + gate * y, modulated_layer_norm(h, shift, scale)); m is computed from h as stored,
    in ``out_dtype`` (h's)."""
    h = gated_residual_ref(x, gate, y, upcast)
    return h, modulated_layer_norm_ref(h, shift, scale, eps, upcast, out_dtype)


def _residual_norm_forward_ref(x, gate, y, shift, scale, eps, out_dtype=None):
    """(h, m, mean, rstd) like the Triton forward; m in out_dtype (h's)."""
    h = gated_residual_ref(x, gate, y)
    hf = h.float()
    mean = hf.mean(-1)
    rstd = torch.rsqrt((hf - mean[..., None]).pow(2).mean(-1) + eps)
    m = (hf - mean[..., None]) * rstd[..., None] * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return h, m.to(out_dtype or h.dtype), mean, rstd


def _residual_norm_backward_ref(dh, dm, h, gate, y, scale, mean, rstd):
    """(dx, dy, dgate, dshift, dscale); dh may be None (h unused downstream); dm in any float dtype."""
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
def _residual_norm_fwd_kernel(
    X,  # (N, T, D) strides (stride_xn, stride_xt, 1)
    GATE,  # (N, D) strides (stride_gate, 1)
    Y,  # (N, T, D) strides (stride_yn, stride_yt, 1)
    SHIFT,  # (N, D) strides (stride_shift, 1)
    SCALE,  # (N, D) strides (stride_scale, 1)
    H,  # (N, T, D) contiguous, promoted dtype
    M,  # (N, T, D) contiguous, out_dtype (h's)
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


# "rows" layout of the fused op (see modulated_layer_norm.py): few warps per program, the next tile's
# loads issued before the current tile's reductions, 1-D accumulators summed per tile.

@jit
def _residual_norm_fwd_rows_kernel(
    X,  # (N, T, D) strides (stride_xn, stride_xt, 1)
    GATE,  # (N, D) strides (stride_gate, 1)
    Y,  # (N, T, D) strides (stride_yn, stride_yt, 1)
    SHIFT,  # (N, D) strides (stride_shift, 1)
    SCALE,  # (N, D) strides (stride_scale, 1)
    H,  # (N, T, D) contiguous, promoted dtype
    M,  # (N, T, D) contiguous, out_dtype (h's)
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
    mask_cols_b = (cb < D)[None, :]
    x_base, y_base = n * stride_xn, n * stride_yn
    first = t_start + tl.arange(0, BLOCK_T)
    xa, xb = load_rows(X, x_base, first, stride_xt, ca, cb, t_end, D)
    ya, yb = load_rows(Y, y_base, first, stride_yt, ca, cb, t_end, D)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        xa_next, xb_next = load_rows(X, x_base, rows + BLOCK_T, stride_xt, ca, cb, t_end, D)  # prefetch
        ya_next, yb_next = load_rows(Y, y_base, rows + BLOCK_T, stride_yt, ca, cb, t_end, D)
        row_ok = rows < t_end
        mask_a = row_ok[:, None]
        mask_b = mask_a & mask_cols_b
        out_rows = n * T + rows
        # per-tile vector reads are L1 hits (one sample's); round h to its storage dtype before
        # normalizing, as the tiles kernel does
        h_a = (xa + load_vector(GATE, n * stride_gate, ca, D)[None, :] * ya).to(H.dtype.element_ty)
        h_b = (xb + load_vector(GATE, n * stride_gate, cb, D)[None, :] * yb).to(H.dtype.element_ty)
        store_tile(H, out_rows * D, ca, h_a, mask_a)
        store_tile(H, out_rows * D, cb, h_b, mask_b)
        hc_a, hc_b, mean, rstd = centered_rows(h_a.to(tl.float32), h_b.to(tl.float32), mask_b, D, eps)
        scale1_a = 1.0 + load_vector(SCALE, n * stride_scale, ca, D)
        scale1_b = 1.0 + load_vector(SCALE, n * stride_scale, cb, D)
        m_a = hc_a * rstd[:, None] * scale1_a[None, :] + load_vector(SHIFT, n * stride_shift, ca, D)[None, :]
        m_b = hc_b * rstd[:, None] * scale1_b[None, :] + load_vector(SHIFT, n * stride_shift, cb, D)[None, :]
        store_tile(M, out_rows * D, ca, m_a, mask_a)
        store_tile(M, out_rows * D, cb, m_b, mask_b)
        tl.store(MEAN + out_rows, mean, mask=row_ok)
        tl.store(RSTD + out_rows, rstd, mask=row_ok)
        xa, xb, ya, yb = xa_next, xb_next, ya_next, yb_next


@jit
def _residual_norm_bwd_rows_kernel(
    DH,  # (N, T, D) strides (stride_dhn, stride_dht, 1); unused unless HAS_DH
    DM,  # (N, T, D) any dtype, strides (stride_dmn, stride_dmt, 1)
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
    mask_cols_b = (cb < D)[None, :]
    h_base, dm_base = n * T * D, n * stride_dmn
    acc_gate_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
    acc_gate_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_shift_a, acc_scale_a = tl.zeros_like(acc_gate_a), tl.zeros_like(acc_gate_a)
    acc_shift_b, acc_scale_b = tl.zeros_like(acc_gate_b), tl.zeros_like(acc_gate_b)
    # prefetch only h and dm, which feed the row reductions; y and dh are used after them, so their
    # loads, issued at the top of the iteration, overlap the reductions anyway (fewer live registers)
    first = t_start + tl.arange(0, BLOCK_T)
    ha, hb = load_rows(H, h_base, first, D, ca, cb, t_end, D)
    dm_a, dm_b = load_rows(DM, dm_base, first, stride_dmt, ca, cb, t_end, D)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        ha_next, hb_next = load_rows(H, h_base, rows + BLOCK_T, D, ca, cb, t_end, D)  # prefetch
        dm_a_next, dm_b_next = load_rows(DM, dm_base, rows + BLOCK_T, stride_dmt, ca, cb, t_end, D)
        ya, yb = load_rows(Y, n * stride_yn, rows, stride_yt, ca, cb, t_end, D)
        row_ok = rows < t_end
        mask_a = row_ok[:, None]
        mask_b = mask_a & mask_cols_b
        mean = load_row_stats(MEAN, n * T, rows, t_end)[:, None]
        rstd = load_row_stats(RSTD, n * T, rows, t_end)
        hhat_a = (ha - mean) * rstd[:, None]  # 0 in masked rows (rstd = 0)
        hhat_b = tl.where(mask_b, (hb - mean) * rstd[:, None], 0.0)
        scale1_a = 1.0 + load_vector(SCALE, n * stride_scale, ca, D)
        scale1_b = 1.0 + load_vector(SCALE, n * stride_scale, cb, D)
        dh_a, dh_b = norm_input_grad(dm_a * scale1_a[None, :], dm_b * scale1_b[None, :], hhat_a, hhat_b, rstd, D)
        if HAS_DH:  # gradient reaching h directly (the residual stream), added to the norm's
            dha_in, dhb_in = load_rows(DH, n * stride_dhn, rows, stride_dht, ca, cb, t_end, D)
            dh_a += dha_in
            dh_b += dhb_in
        out_rows = (n * T + rows) * D
        store_tile(DX, out_rows, ca, dh_a, mask_a)
        store_tile(DX, out_rows, cb, dh_b, mask_b)
        store_tile(DY, out_rows, ca, dh_a * load_vector(GATE, n * stride_gate, ca, D)[None, :], mask_a)
        store_tile(DY, out_rows, cb, dh_b * load_vector(GATE, n * stride_gate, cb, D)[None, :], mask_b)
        acc_gate_a += tl.sum(dh_a * ya, axis=0)
        acc_gate_b += tl.sum(dh_b * yb, axis=0)
        acc_shift_a += tl.sum(dm_a, axis=0)
        acc_shift_b += tl.sum(dm_b, axis=0)
        acc_scale_a += tl.sum(dm_a * hhat_a, axis=0)
        acc_scale_b += tl.sum(dm_b * hhat_b, axis=0)
        ha, hb, dm_a, dm_b = ha_next, hb_next, dm_a_next, dm_b_next
    part = (n * n_chunks + chunk) * D
    store_vector(DGATE_PART, part, ca, acc_gate_a, D)
    store_vector(DGATE_PART, part, cb, acc_gate_b, D)
    store_vector(DSHIFT_PART, part, ca, acc_shift_a, D)
    store_vector(DSHIFT_PART, part, cb, acc_shift_b, D)
    store_vector(DSCALE_PART, part, ca, acc_scale_a, D)
    store_vector(DSCALE_PART, part, cb, acc_scale_b, D)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def gated_residual_norm_fwd(x, gate, y, shift, scale, eps, out_dtype=None, layout=None, **config_overrides):
    """Triton forward: (h promoted dtype, m out_dtype (h's), mean and rstd (N, T) fp32)."""
    check_launchable(x.device)
    x, gate, y, shift, scale = _prepare(x, gate, y, shift, scale)
    N, T, D = x.shape
    cfg = layout_config(layout, x.device, N, T, D, {}, ROWS_RESIDUAL_FORWARD, config_overrides)
    kernel = _residual_norm_fwd_rows_kernel if check_layout(layout) == "rows" else _residual_norm_fwd_kernel
    h = torch.empty((N, T, D), dtype=residual_dtype(x, gate, y), device=x.device)
    m = torch.empty((N, T, D), dtype=out_dtype or h.dtype, device=x.device)
    mean = torch.empty((N, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    (wrap_triton(kernel) if traced(x) else kernel)[(cfg.n_chunks, N)](
        x, gate, y, shift, scale, h, m, mean, rstd, T, D, cfg.rows_per_program,
        x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1), shift.stride(0),
        scale.stride(0), eps,
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return h, m, mean, rstd


def gated_residual_norm_bwd(dh, dm, h, gate, y, scale, mean, rstd, layout=None, **config_overrides):
    """Triton backward: (dx h.dtype, dy y.dtype, dgate gate.dtype, dshift, dscale scale.dtype); dm in
    any float dtype (the forward's out_dtype)."""
    check_launchable(h.device)
    dm, gate, y, scale = _prepare(dm, gate, y, scale)
    h = h.contiguous()
    has_dh = dh is not None
    dh = last_dim_contiguous(dh) if has_dh else dm  # a placeholder pointer when absent
    N, T, D = h.shape
    cfg = layout_config(layout, h.device, N, T, D, BACKWARD_RESIDUAL_TILES, ROWS_RESIDUAL_BACKWARD,
                        config_overrides)
    kernel = _residual_norm_bwd_rows_kernel if check_layout(layout) == "rows" else _residual_norm_bwd_kernel
    dx = torch.empty((N, T, D), dtype=h.dtype, device=h.device)
    dy = torch.empty((N, T, D), dtype=y.dtype, device=h.device)
    dgate_part, dshift_part, dscale_part = (
        torch.empty((N, cfg.n_chunks, D), dtype=torch.float32, device=h.device) for _ in range(3))
    (wrap_triton(kernel) if traced(h) else kernel)[(cfg.n_chunks, N)](
        dh, dm, h, gate, y, scale, mean, rstd, dx, dy, dgate_part, dshift_part, dscale_part,
        T, D, cfg.rows_per_program, cfg.n_chunks,
        dh.stride(0), dh.stride(1), dm.stride(0), dm.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        scale.stride(0),
        HAS_DH=has_dh, BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return (dx, dy, dgate_part.sum(1).to(gate.dtype), dshift_part.sum(1).to(scale.dtype),
            dscale_part.sum(1).to(scale.dtype))


# ---------------------------------------------------------------------------------------------
# Ops: triton_ops with explicit fakes and autograd (see modulated_layer_norm.py)
# ---------------------------------------------------------------------------------------------

@adaln_op("dit_fast::gated_residual_norm")
def _residual_norm_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                      scale: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
                      layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    if kernels_run_on(x):
        return gated_residual_norm_fwd(x, gate, y, shift, scale, eps, out_dtype, layout)
    return _residual_norm_forward_ref(x, gate, y, shift, scale, eps, out_dtype)


@_residual_norm_op.register_fake
def _(x, gate, y, shift, scale, eps, out_dtype=None, layout=None):
    N, T, D = x.shape
    h = torch.empty((N, T, D), dtype=residual_dtype(x, gate, y), device=x.device)
    stats = x.new_empty((N, T), dtype=torch.float32)
    return h, torch.empty_like(h, dtype=out_dtype or h.dtype), stats, torch.empty_like(stats)


@adaln_op("dit_fast::gated_residual_norm_backward")
def _residual_norm_backward_op(
    dh: torch.Tensor | None, dm: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
    scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, layout: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernels_run_on(h):
        return gated_residual_norm_bwd(dh, dm, h, gate, y, scale, mean, rstd, layout)
    return _residual_norm_backward_ref(dh, dm, h, gate, y, scale, mean, rstd)


@_residual_norm_backward_op.register_fake
def _(dh, dm, h, gate, y, scale, mean, rstd, layout=None):
    N, T, D = h.shape
    return (h.new_empty((N, T, D)), y.new_empty((N, T, D)), gate.new_empty((N, D)),
            scale.new_empty((N, D)), scale.new_empty((N, D)))


def _residual_norm_setup_context(ctx, inputs, output):
    x, gate, y, shift, scale, _, _, layout = inputs
    h, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h, gate, y, scale, mean, rstd)
    ctx.x_dtype, ctx.shift_dtype, ctx.layout = x.dtype, shift.dtype, layout


def _residual_norm_backward(ctx, dh, dm, _dmean, _drstd):
    h, gate, y, scale, mean, rstd = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = _residual_norm_backward_op(dh, dm, h, gate, y, scale, mean, rstd, ctx.layout)
    return dx.to(ctx.x_dtype), dgate, dy, dshift.to(ctx.shift_dtype), dscale, None, None, None


_residual_norm_op.register_autograd(_residual_norm_backward, setup_context=_residual_norm_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def gated_residual_norm(x, gate, y, shift, scale, eps=1e-6, out_dtype=None, layout=None):
    """Gated residual and the next sublayer's modulated LayerNorm in one pass.

    Args:
        x, y: (N, T, D) residual stream and sublayer output, fp32 / fp16 / bf16.
        gate, shift, scale: (N, D) per-sample adaLN vectors, any float dtype (views are fine).
        eps: LayerNorm epsilon (DiT uses 1e-6).
        out_dtype: dtype of m (None: h's). Under autocast pass the autocast dtype: m is written as the
            next GEMM's input, with the bits of ``m_fp32.to(out_dtype)``; dm comes back in that dtype.
        layout: kernel tiling of the fused op, "tiles" or "rows" (None: the default).
    Returns:
        (h, m), (N, T, D): ``h = x + gate[:, None] * y`` in the promoted dtype of (x, gate, y) and
        ``m = LayerNorm(h, no affine, eps) * (1 + scale[:, None]) + shift[:, None]`` (of h as stored,
        fp32 statistics) in out_dtype. Gradients may flow into both h and m; the backward is
        deterministic.
    """
    _check_residual(x, gate, y)
    check_modulation("shift", x, shift)
    check_modulation("scale", x, scale)
    check_out_dtype(out_dtype)
    h, m, _, _ = _residual_norm_op(x, gate, y, shift, scale, float(eps), out_dtype, check_layout(layout))
    return h, m
