"""Fused adaLN modulation: ``LayerNorm(x, no affine) * (1 + scale) + shift``, forward and backward.

DiT applies this before every attention and MLP sublayer. Unfused it costs a LayerNorm pass plus two
broadcast elementwise passes (and their backward); fused it is one read of x and one write.

Anatomy (the same in every op file): reference -> Triton kernels -> launchers -> ops (``dit_fast::``) with fake
and autograd registrations -> public function. Shared helpers and launch configs: adaln_tiles.py.

Kernel layout: the grid is (chunks of T, N). A program owns ``rows_per_program`` consecutive tokens
of ONE sample, so a block of rows never straddles two samples. Rows are processed ``BLOCK_T`` at a time;
the whole row (two power-of-two column blocks, see the kernels) sits in registers, so the variance is an
exact two-pass ``mean((x - mean)^2)`` (no one-pass cancellation for rows with a large mean). All
statistics and accumulations are fp32. The backward writes per-(sample, chunk) partial sums of
dshift/dscale to a buffer that a torch sum reduces: no atomics, so two runs give identical bits.

Two tilings (``layout``), same numbers up to fp32 summation order:
- ``"tiles"``: BLOCK_T rows x several warps per program, shift/scale held in registers for the
  program, 2-D (BLOCK_T, D) accumulators in the backward. The tuned default of the 2026-11-26 H200 sweep.
- ``"rows"``: one row per tile and as few warps as hold it without spilling (the forward: one warp,
  so every row reduction is a warp shuffle with no block barrier; the backward: two); a one-wave grid
  (``programs_per_sm`` x SM count programs, each looping over its span of rows); the next tile's
  loads are issued before the current tile's reductions (register double-buffering); shift/scale
  re-read per tile from L1 instead of pinned in registers; backward accumulators are 1-D (D,) vectors
  summed per tile. Built for memory-level parallelism (more bytes in flight per SM); not yet timed.

``out_dtype`` (default: x's dtype) is the dtype m is written in: under autocast the kernels emit the
GEMM input (bf16/fp16) directly, rounded to nearest even from the fp32 result -- the same bits as
autocast's own cast of an fp32 m -- and the backward takes dm in that dtype (upcast in registers).

Registration: ``torch.library.triton_op`` with the launches wrapped by ``wrap_triton``, so inductor
sees (and CUDA graphs capture) the kernels themselves; an explicit fake and an autograd formula.
"""
import torch
from torch.library import wrap_triton  # torch >= 2.6; importable without triton

from dit_fast_kernels.adaln_tiles import (  # noqa: F401  (DEFAULT_LAYOUT, LAYOUTS, launch_config: re-exported)
    BACKWARD_NORM_TILES, DEFAULT_LAYOUT, LAYOUTS, ROWS_BACKWARD, ROWS_FORWARD, adaln_op, centered_rows,
    check_launchable, check_layout, check_modulation, check_out_dtype, check_tokens, jit, last_dim_contiguous,
    launch_config, layout_config, load_row_stats, load_rows, load_tile, load_vector, norm_input_grad,
    store_partial_sum, store_tile, store_vector, tl, traced, use_triton,
)


# ---------------------------------------------------------------------------------------------
# Reference (readable torch, fp32 upcast)
# ---------------------------------------------------------------------------------------------

def modulated_layer_norm_ref(x, shift, scale, eps=1e-6, upcast=True, out_dtype=None):
    """LayerNorm(x, no affine, eps) * (1 + scale[:, None]) + shift[:, None], in ``out_dtype`` (x's).

    ``upcast=False`` computes in the input dtype (the "PyTorch in the same dtype" error baseline).
    """
    dtype = x.dtype
    if upcast:  # to fp32, or keep float64 (the tests' gold)
        wide = torch.promote_types(dtype, torch.float32)
        x, shift, scale = x.to(wide), shift.to(wide), scale.to(wide)
    mean = x.mean(-1, keepdim=True)  # (N, T, 1)
    var = (x - mean).pow(2).mean(-1, keepdim=True)  # biased, as nn.LayerNorm
    out = (x - mean) * torch.rsqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]
    return out.to(out_dtype or dtype)


def _forward_ref(x, shift, scale, eps, out_dtype=None):
    """(out, mean, rstd) like the Triton forward; out in out_dtype (x's), mean/rstd (N, T) fp32."""
    xf = x.float()
    mean = xf.mean(-1)
    rstd = torch.rsqrt((xf - mean[..., None]).pow(2).mean(-1) + eps)
    xhat = (xf - mean[..., None]) * rstd[..., None]
    out = xhat * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return out.to(out_dtype or x.dtype), mean, rstd


def _backward_ref(dout, x, scale, mean, rstd):
    """(dx, dshift, dscale) from the saved statistics, in fp32, cast to the input dtypes (dout: any)."""
    xhat = (x.float() - mean[..., None]) * rstd[..., None]  # (N, T, D)
    dy = dout.float()
    g = dy * (1 + scale.float()[:, None])  # gradient w.r.t. xhat
    dx = rstd[..., None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dy.sum(1).to(scale.dtype), (dy * xhat).sum(1).to(scale.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels (tile helpers: adaln_tiles.py)
# ---------------------------------------------------------------------------------------------

@jit
def _mln_fwd_kernel(
    X,  # (N, T, D) any dtype, strides (stride_xn, stride_xt, 1)
    SHIFT,  # (N, D) strides (stride_shift, 1)
    SCALE,  # (N, D) strides (stride_scale, 1)
    OUT,  # (N, T, D) contiguous, x's dtype
    MEAN,  # (N, T) fp32 contiguous
    RSTD,  # (N, T) fp32 contiguous
    T, D, rows_per_program,
    stride_xn, stride_xt, stride_shift, stride_scale,
    eps,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    t_start = tl.program_id(0) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    shift_a, shift_b = load_vector(SHIFT, n * stride_shift, ca, D), load_vector(SHIFT, n * stride_shift, cb, D)
    scale1_a = 1.0 + load_vector(SCALE, n * stride_scale, ca, D)
    scale1_b = 1.0 + load_vector(SCALE, n * stride_scale, cb, D)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        mask_a = row_ok[:, None]
        mask_b = row_ok[:, None] & (cb < D)[None, :]
        x_rows = n * stride_xn + rows * stride_xt
        xa, xb, mean, rstd = centered_rows(load_tile(X, x_rows, ca, mask_a), load_tile(X, x_rows, cb, mask_b),
                                           mask_b, D, eps)
        out_rows = n * T + rows
        store_tile(OUT, out_rows * D, ca, xa * rstd[:, None] * scale1_a[None, :] + shift_a[None, :], mask_a)
        store_tile(OUT, out_rows * D, cb, xb * rstd[:, None] * scale1_b[None, :] + shift_b[None, :], mask_b)
        tl.store(MEAN + out_rows, mean, mask=row_ok)
        tl.store(RSTD + out_rows, rstd, mask=row_ok)


@jit
def _mln_bwd_kernel(
    DOUT,  # (N, T, D) strides (stride_dn, stride_dt, 1)
    X,  # (N, T, D) strides (stride_xn, stride_xt, 1)
    SCALE,  # (N, D) strides (stride_scale, 1)
    MEAN,  # (N, T) fp32 contiguous
    RSTD,  # (N, T) fp32 contiguous
    DX,  # (N, T, D) contiguous, x's dtype
    DSHIFT_PART,  # (N, n_chunks, D) fp32: this program's partial sum over its rows
    DSCALE_PART,  # (N, n_chunks, D) fp32
    T, D, rows_per_program, n_chunks,
    stride_dn, stride_dt, stride_xn, stride_xt, stride_scale,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(0)
    t_start = chunk * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    scale1_a = 1.0 + load_vector(SCALE, n * stride_scale, ca, D)
    scale1_b = 1.0 + load_vector(SCALE, n * stride_scale, cb, D)
    # 2-D accumulators: summed over rows once at the end, not per tile
    acc_shift_a = tl.zeros((BLOCK_T, BLOCK_A), dtype=tl.float32)
    acc_shift_b = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
    acc_scale_a = tl.zeros((BLOCK_T, BLOCK_A), dtype=tl.float32)
    acc_scale_b = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        mask_a = row_ok[:, None]
        mask_b = row_ok[:, None] & (cb < D)[None, :]
        mean = tl.load(MEAN + n * T + rows, mask=row_ok, other=0.0)[:, None]
        rstd = tl.load(RSTD + n * T + rows, mask=row_ok, other=0.0)
        x_rows = n * stride_xn + rows * stride_xt
        xhat_a = (load_tile(X, x_rows, ca, mask_a) - mean) * rstd[:, None]  # 0 in masked rows (rstd = 0)
        xhat_b = tl.where(mask_b, (load_tile(X, x_rows, cb, mask_b) - mean) * rstd[:, None], 0.0)
        d_rows = n * stride_dn + rows * stride_dt
        dy_a, dy_b = load_tile(DOUT, d_rows, ca, mask_a), load_tile(DOUT, d_rows, cb, mask_b)
        dx_a, dx_b = norm_input_grad(dy_a * scale1_a[None, :], dy_b * scale1_b[None, :], xhat_a, xhat_b, rstd, D)
        out_rows = (n * T + rows) * D
        store_tile(DX, out_rows, ca, dx_a, mask_a)
        store_tile(DX, out_rows, cb, dx_b, mask_b)
        acc_shift_a += dy_a
        acc_shift_b += dy_b
        acc_scale_a += dy_a * xhat_a
        acc_scale_b += dy_b * xhat_b
    part = (n * n_chunks + chunk) * D
    store_partial_sum(DSHIFT_PART, part, ca, acc_shift_a, D)
    store_partial_sum(DSHIFT_PART, part, cb, acc_shift_b, D)
    store_partial_sum(DSCALE_PART, part, ca, acc_scale_a, D)
    store_partial_sum(DSCALE_PART, part, cb, acc_scale_b, D)


# "rows" layout: few warps per program (the forward: num_warps=1, so tl.sum over a row is a warp
# shuffle with no bar.sync); BLOCK_T rows per tile (1 at D = 1152, more for narrow D so each warp still
# moves ~1K values per tile). Each loop iteration first issues the NEXT tile's loads (masked off past
# t_end: no traffic), then reduces and stores the current tile, so a program always has a tile in flight.

@jit
def _mln_fwd_rows_kernel(
    X,  # (N, T, D) any dtype, strides (stride_xn, stride_xt, 1)
    SHIFT,  # (N, D) strides (stride_shift, 1)
    SCALE,  # (N, D) strides (stride_scale, 1)
    OUT,  # (N, T, D) contiguous, out_dtype
    MEAN,  # (N, T) fp32 contiguous
    RSTD,  # (N, T) fp32 contiguous
    T, D, rows_per_program,
    stride_xn, stride_xt, stride_shift, stride_scale,
    eps,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    t_start = tl.program_id(0) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    mask_cols_b = (cb < D)[None, :]
    x_base = n * stride_xn
    xa, xb = load_rows(X, x_base, t_start + tl.arange(0, BLOCK_T), stride_xt, ca, cb, t_end, D)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        xa_next, xb_next = load_rows(X, x_base, rows + BLOCK_T, stride_xt, ca, cb, t_end, D)  # prefetch
        row_ok = rows < t_end
        mask_a = row_ok[:, None]
        mask_b = mask_a & mask_cols_b
        xc_a, xc_b, mean, rstd = centered_rows(xa, xb, mask_b, D, eps)
        # shift/scale re-read per tile (L1 hits: one sample's 2 x D values) rather than pinned in
        # registers for the whole program: the registers go to the prefetched tile instead
        shift_a, shift_b = load_vector(SHIFT, n * stride_shift, ca, D), load_vector(SHIFT, n * stride_shift, cb, D)
        scale1_a = 1.0 + load_vector(SCALE, n * stride_scale, ca, D)
        scale1_b = 1.0 + load_vector(SCALE, n * stride_scale, cb, D)
        out_rows = n * T + rows
        store_tile(OUT, out_rows * D, ca, xc_a * rstd[:, None] * scale1_a[None, :] + shift_a[None, :], mask_a)
        store_tile(OUT, out_rows * D, cb, xc_b * rstd[:, None] * scale1_b[None, :] + shift_b[None, :], mask_b)
        tl.store(MEAN + out_rows, mean, mask=row_ok)
        tl.store(RSTD + out_rows, rstd, mask=row_ok)
        xa, xb = xa_next, xb_next


@jit
def _mln_bwd_rows_kernel(
    DOUT,  # (N, T, D) any dtype, strides (stride_dn, stride_dt, 1)
    X,  # (N, T, D) strides (stride_xn, stride_xt, 1)
    SCALE,  # (N, D) strides (stride_scale, 1)
    MEAN,  # (N, T) fp32 contiguous
    RSTD,  # (N, T) fp32 contiguous
    DX,  # (N, T, D) contiguous, x's dtype
    DSHIFT_PART,  # (N, n_chunks, D) fp32: this program's partial sum over its rows
    DSCALE_PART,  # (N, n_chunks, D) fp32
    T, D, rows_per_program, n_chunks,
    stride_dn, stride_dt, stride_xn, stride_xt, stride_scale,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(0)
    t_start = chunk * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    mask_cols_b = (cb < D)[None, :]
    x_base, d_base, stat_base = n * stride_xn, n * stride_dn, n * T
    # 1-D (D,) accumulators, each tile summed over its rows in-warp: D / 32 fp32 registers per thread
    # each, instead of (BLOCK_T, D) tiles
    acc_shift_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
    acc_shift_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
    acc_scale_a = tl.zeros((BLOCK_A,), dtype=tl.float32)
    acc_scale_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
    rows = t_start + tl.arange(0, BLOCK_T)
    xa, xb = load_rows(X, x_base, rows, stride_xt, ca, cb, t_end, D)
    dy_a, dy_b = load_rows(DOUT, d_base, rows, stride_dt, ca, cb, t_end, D)
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        xa_next, xb_next = load_rows(X, x_base, rows + BLOCK_T, stride_xt, ca, cb, t_end, D)  # prefetch
        dy_a_next, dy_b_next = load_rows(DOUT, d_base, rows + BLOCK_T, stride_dt, ca, cb, t_end, D)
        row_ok = rows < t_end
        mask_a = row_ok[:, None]
        mask_b = mask_a & mask_cols_b
        mean = load_row_stats(MEAN, stat_base, rows, t_end)[:, None]
        rstd = load_row_stats(RSTD, stat_base, rows, t_end)
        xhat_a = (xa - mean) * rstd[:, None]  # 0 in masked rows (rstd = 0)
        xhat_b = tl.where(mask_b, (xb - mean) * rstd[:, None], 0.0)
        scale1_a = 1.0 + load_vector(SCALE, n * stride_scale, ca, D)  # L1 hits, see the forward
        scale1_b = 1.0 + load_vector(SCALE, n * stride_scale, cb, D)
        dx_a, dx_b = norm_input_grad(dy_a * scale1_a[None, :], dy_b * scale1_b[None, :], xhat_a, xhat_b, rstd, D)
        out_rows = (n * T + rows) * D
        store_tile(DX, out_rows, ca, dx_a, mask_a)
        store_tile(DX, out_rows, cb, dx_b, mask_b)
        acc_shift_a += tl.sum(dy_a, axis=0)
        acc_shift_b += tl.sum(dy_b, axis=0)
        acc_scale_a += tl.sum(dy_a * xhat_a, axis=0)
        acc_scale_b += tl.sum(dy_b * xhat_b, axis=0)
        xa, xb, dy_a, dy_b = xa_next, xb_next, dy_a_next, dy_b_next
    part = (n * n_chunks + chunk) * D
    store_vector(DSHIFT_PART, part, ca, acc_shift_a, D)
    store_vector(DSHIFT_PART, part, cb, acc_shift_b, D)
    store_vector(DSCALE_PART, part, ca, acc_scale_a, D)
    store_vector(DSCALE_PART, part, cb, acc_scale_b, D)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def modulated_layer_norm_fwd(x, shift, scale, eps, out_dtype=None, layout=None, **config_overrides):
    """Triton forward: (out (N, T, D) in out_dtype (x's), mean (N, T) fp32, rstd (N, T) fp32)."""
    check_launchable(x.device)
    x, shift, scale = last_dim_contiguous(x), last_dim_contiguous(shift), last_dim_contiguous(scale)
    N, T, D = x.shape
    cfg = layout_config(layout, x.device, N, T, D, {}, ROWS_FORWARD, config_overrides)
    kernel = _mln_fwd_rows_kernel if check_layout(layout) == "rows" else _mln_fwd_kernel
    out = torch.empty((N, T, D), dtype=out_dtype or x.dtype, device=x.device)
    mean = torch.empty((N, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    (wrap_triton(kernel) if traced(x) else kernel)[(cfg.n_chunks, N)](
        x, shift, scale, out, mean, rstd, T, D, cfg.rows_per_program,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), eps,
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return out, mean, rstd


def modulated_layer_norm_bwd(dout, x, scale, mean, rstd, layout=None, **config_overrides):
    """Triton backward: (dx x.dtype, dshift, dscale scale.dtype); dout in any float dtype (the
    forward's out_dtype); deterministic (no atomics)."""
    check_launchable(x.device)
    dout, x, scale = last_dim_contiguous(dout), last_dim_contiguous(x), last_dim_contiguous(scale)
    N, T, D = x.shape
    # tiles: fewer chunks (smaller partial-sum buffers), one row per tile (two fp32 accumulators per value)
    cfg = layout_config(layout, x.device, N, T, D, BACKWARD_NORM_TILES, ROWS_BACKWARD, config_overrides)
    kernel = _mln_bwd_rows_kernel if check_layout(layout) == "rows" else _mln_bwd_kernel
    dx = torch.empty((N, T, D), dtype=x.dtype, device=x.device)
    dshift_part = torch.empty((N, cfg.n_chunks, D), dtype=torch.float32, device=x.device)
    dscale_part = torch.empty_like(dshift_part)
    (wrap_triton(kernel) if traced(x) else kernel)[(cfg.n_chunks, N)](
        dout, x, scale, mean, rstd, dx, dshift_part, dscale_part,
        T, D, cfg.rows_per_program, cfg.n_chunks,
        dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), scale.stride(0),
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return dx, dshift_part.sum(1).to(scale.dtype), dscale_part.sum(1).to(scale.dtype)


def kernels_run_on(x) -> bool:
    """Launch the kernels for ``x`` (True) or compute the reference (False). Under torch.compile the
    op bodies are traced with fake tensors: on CUDA wrap_triton records the launch for inductor; the
    interpreter cannot run on fake tensors, so a traced CPU op becomes the reference's torch ops."""
    return use_triton(x.device) and not (x.device.type == "cpu" and traced(x))


# ---------------------------------------------------------------------------------------------
# Ops: triton_op (inductor sees the launches), explicit fakes, autograd registrations
# ---------------------------------------------------------------------------------------------
# triton_op's eager path calls the kernels directly (no HOP dispatch); under torch.compile the body is
# traced, so the graph holds the Triton kernels themselves (and the partial-sum reductions) rather than
# an opaque call. The reference is the CPU implementation (kernels_run_on), through the same body.

@adaln_op("dit_fast::modulated_layer_norm")
def _mln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
            out_dtype: torch.dtype | None = None,
            layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernels_run_on(x):
        return modulated_layer_norm_fwd(x, shift, scale, eps, out_dtype, layout)
    return _forward_ref(x, shift, scale, eps, out_dtype)


@_mln_op.register_fake
def _(x, shift, scale, eps, out_dtype=None, layout=None):
    N, T, D = x.shape
    stats = x.new_empty((N, T), dtype=torch.float32)
    return x.new_empty((N, T, D), dtype=out_dtype or x.dtype), stats, torch.empty_like(stats)


@adaln_op("dit_fast::modulated_layer_norm_backward")
def _mln_backward_op(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor,
                     layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kernels_run_on(x):
        return modulated_layer_norm_bwd(dout, x, scale, mean, rstd, layout)
    return _backward_ref(dout, x, scale, mean, rstd)


@_mln_backward_op.register_fake
def _(dout, x, scale, mean, rstd, layout=None):
    N, T, D = x.shape
    return x.new_empty((N, T, D)), scale.new_empty((N, D)), scale.new_empty((N, D))


def _setup_context(ctx, inputs, output):
    x, shift, scale, _, _, layout = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype, ctx.layout = shift.dtype, layout


def _backward(ctx, dout, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _mln_backward_op(dout, x, scale, mean, rstd, ctx.layout)
    return dx, dshift.to(ctx.shift_dtype), dscale, None, None, None


_mln_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def modulated_layer_norm(x, shift, scale, eps=1e-6, out_dtype=None, layout=None):
    """DiT's ``modulate(LayerNorm(x), shift, scale)`` in one fused pass.

    Args:
        x: (N, T, D) tokens, fp32 / fp16 / bf16 (any strides with unit stride along D are fine).
        shift, scale: (N, D) per-sample modulation, any float dtype; views such as chunks of the
            adaLN output (N, 6D) are used without a copy.
        eps: LayerNorm epsilon (DiT uses 1e-6).
        out_dtype: dtype of the result (None: x's). Under autocast pass the autocast dtype: the kernel
            writes the next GEMM's input directly, with the bits of ``result_fp32.to(out_dtype)``, and
            the backward takes its gradient in that dtype (no separate cast kernels either way).
        layout: kernel tiling, "tiles" or "rows" (None: DEFAULT_LAYOUT); same numbers up to fp32
            summation order.
    Returns:
        (N, T, D) in out_dtype: ``LayerNorm(x, no affine, eps) * (1 + scale[:, None]) + shift[:, None]``
        with fp32 statistics. Differentiable w.r.t. x, shift and scale (deterministic backward; the
        gradients come back in the inputs' dtypes).
    Runs the Triton kernels on CUDA (or on the CPU under TRITON_INTERPRET=1), the fp32 reference
    otherwise; a ``dit_fast::modulated_layer_norm`` triton_op, so torch.compile does not break and
    inductor sees the kernels.
    """
    check_tokens("x", x)
    check_modulation("shift", x, shift)
    check_modulation("scale", x, scale)
    check_out_dtype(out_dtype)
    return _mln_op(x, shift, scale, float(eps), out_dtype, check_layout(layout))[0]
