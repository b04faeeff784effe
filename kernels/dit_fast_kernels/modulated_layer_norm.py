"""Fused adaLN modulation: ``LayerNorm(x, no affine) * (1 + scale) + shift``, forward and backward.

DiT applies this before every attention and MLP sublayer. Unfused it costs a LayerNorm pass plus two
broadcast elementwise passes (and their backward); fused it is one read of x and one write.

Anatomy (the same in every op file): reference -> Triton kernels -> launchers -> custom ops (``dit_fast::``) with fake
and autograd registrations -> public function.

Kernel layout: the grid is (chunks of T, N). A program owns ``rows_per_program`` consecutive tokens
of ONE sample, so a block of rows never straddles two samples and the sample's shift/scale vectors are
loaded once per program instead of once per row. Rows are processed ``BLOCK_T`` at a time; the whole
row (two power-of-two column blocks, see the kernels) sits in registers, so the variance is an exact two-pass
``mean((x - mean)^2)`` (no one-pass cancellation for rows with a large mean). All statistics and
accumulations are fp32. The backward writes per-(sample, chunk) partial sums of dshift/dscale to a
buffer that a torch sum reduces: no atomics, so two runs give identical bits.
"""
import os
import types

import torch

from dit_fast_kernels.runtime import triton_status

try:  # Triton is optional: without it the custom ops run the reference.
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # keeps the kernel signatures below importable

    def jit(fn):
        return fn

# Kernels are built as interpreter functions only if TRITON_INTERPRET=1 is set when this module is
# imported; remember it to give a clear error instead of a cryptic one later.
KERNELS_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_D = 65536  # a whole row must fit in one program's registers


# ---------------------------------------------------------------------------------------------
# Reference (readable torch, fp32 upcast)
# ---------------------------------------------------------------------------------------------

def modulated_layer_norm_ref(x, shift, scale, eps=1e-6, upcast=True):
    """LayerNorm(x, no affine, eps) * (1 + scale[:, None]) + shift[:, None], in x's dtype.

    ``upcast=False`` computes in the input dtype (the "PyTorch in the same dtype" error baseline).
    """
    dtype = x.dtype
    if upcast:  # to fp32, or keep float64 (the tests' gold)
        wide = torch.promote_types(dtype, torch.float32)
        x, shift, scale = x.to(wide), shift.to(wide), scale.to(wide)
    mean = x.mean(-1, keepdim=True)  # (N, T, 1)
    var = (x - mean).pow(2).mean(-1, keepdim=True)  # biased, as nn.LayerNorm
    out = (x - mean) * torch.rsqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]
    return out.to(dtype)


def _forward_ref(x, shift, scale, eps):
    """(out, mean, rstd) like the Triton forward; mean/rstd (N, T) fp32."""
    xf = x.float()
    mean = xf.mean(-1)
    rstd = torch.rsqrt((xf - mean[..., None]).pow(2).mean(-1) + eps)
    xhat = (xf - mean[..., None]) * rstd[..., None]
    out = xhat * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return out.to(x.dtype), mean, rstd


def _backward_ref(dout, x, scale, mean, rstd):
    """(dx, dshift, dscale) from the saved statistics, in fp32, cast to the input dtypes."""
    xhat = (x.float() - mean[..., None]) * rstd[..., None]  # (N, T, D)
    dy = dout.float()
    g = dy * (1 + scale.float()[:, None])  # gradient w.r.t. xhat
    dx = rstd[..., None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dy.sum(1).to(scale.dtype), (dy * xhat).sum(1).to(scale.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels (the shared tile helpers are also used by gated_residual.py)
# ---------------------------------------------------------------------------------------------
# A row of D values is held as two power-of-two column blocks: A = [0, BLOCK_A), always inside D (no
# column mask), and B = [BLOCK_A, BLOCK_A + BLOCK_B), masked at D. D = 1152 runs as 1024 + 128
# instead of one 2048-wide block that is 44% padding: fewer registers, more rows in flight per SM.

@jit
def load_tile(PTR, row_offsets, cols, mask):
    """fp32 (BLOCK_T, len(cols)) tile at PTR + row_offsets[:, None] + cols[None, :], 0 where masked."""
    return tl.load(PTR + row_offsets[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@jit
def store_tile(PTR, row_offsets, cols, value, mask):
    tl.store(PTR + row_offsets[:, None] + cols[None, :], value.to(PTR.dtype.element_ty), mask=mask)


@jit
def load_vector(PTR, offset, cols, D):
    """fp32 per-sample vector (shift, scale, gate) at PTR + offset + cols, 0 past D."""
    return tl.load(PTR + offset + cols, mask=cols < D, other=0.0).to(tl.float32)


@jit
def store_partial_sum(PTR, offset, cols, acc, D):
    """Sum a (BLOCK_T, len(cols)) accumulator over its rows into PTR + offset + cols."""
    tl.store(PTR + offset + cols, tl.sum(acc, axis=0), mask=cols < D)


@jit
def centered_rows(xa, xb, mask_b, D, eps):
    """Rows split as (xa, xb), 0 where masked -> (xa - mean, xb - mean (0 where masked), mean, rstd)."""
    mean = (tl.sum(xa, axis=1) + tl.sum(xb, axis=1)) / D
    xa = xa - mean[:, None]
    xb = tl.where(mask_b, xb - mean[:, None], 0.0)
    # two-pass variance from the centered values held in registers: exact for rows with a large mean
    rstd = tl.rsqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / D + eps)
    return xa, xb, mean, rstd


@jit
def norm_input_grad(ga, gb, xhat_a, xhat_b, rstd, D):
    """dL/dx of xhat = (x - mean) * rstd from g = dL/dxhat (column blocks, 0 where masked)."""
    c_mean = (tl.sum(ga, axis=1) + tl.sum(gb, axis=1)) / D
    c_proj = (tl.sum(ga * xhat_a, axis=1) + tl.sum(gb * xhat_b, axis=1)) / D
    dxa = (ga - c_mean[:, None] - xhat_a * c_proj[:, None]) * rstd[:, None]
    dxb = (gb - c_mean[:, None] - xhat_b * c_proj[:, None]) * rstd[:, None]
    return dxa, dxb


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


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

class LaunchConfig(types.SimpleNamespace):
    """BLOCK_T rows x (BLOCK_A + BLOCK_B) columns per tile, rows_per_program tokens per program."""


# plain-Python integer helpers: triton.cdiv / next_power_of_2 are jit wrappers costing microseconds
# per call, and the launch path runs once per op call

def _floor_pow2(v):
    return 1 << (max(1, int(v)).bit_length() - 1)


def _ceil_pow2(v):
    return 1 << (max(1, int(v)) - 1).bit_length()


def _cdiv(a, b):
    return -(-a // b)


def column_blocks(D):
    """(BLOCK_A, BLOCK_B): powers of two, BLOCK_A < D <= BLOCK_A + BLOCK_B; e.g. 1152 -> (1024, 128)."""
    if D == 1:
        return 1, 1  # block B fully masked
    block_a = _floor_pow2(D)
    if block_a == D:
        block_a //= 2
    return block_a, _ceil_pow2(D - block_a)


def launch_config(N, T, D, tile_elems=8192, elems_per_thread=32, target_programs=2048, block_t=None,
                  rows_per_program=None, num_warps=None):
    """Tile and grid sizes: BLOCK_T rows of about ``tile_elems`` values per tile, ~``elems_per_thread``
    values per thread, ~``target_programs`` programs. ``block_t`` / ``rows_per_program`` /
    ``num_warps`` override the heuristics (tests use tiny tiles so that the interpreter runs multi-tile
    loops and chunk tails).

    Defaults (per kernel, see the launchers) are the fastest of benchmarks/test_bench_adaln.py's tile
    sweep at (128, 256, 1152) bf16 on an H200 (benchmarks/results/2026-11-26-h200-kernels-run1):
    forward 4 rows x 4 warps, modulated-norm backward 1 row x 8 warps, fused backward 2 rows x 4 warps;
    all free of register spills at D = 1152 on sm_90.
    """
    if D > MAX_D:
        raise ValueError(f"D={D} is too large for the fused adaLN kernels (at most {MAX_D}); "
                         "use the torch backend (fused_adaln=False)")
    block_a, block_b = column_blocks(D)
    if block_t is None:
        # several rows per tile when D is small, so every program moves a useful amount of memory
        block_t = min(_floor_pow2(tile_elems // (block_a + block_b)), _ceil_pow2(T))
    if rows_per_program is None:
        tiles = _cdiv(T, block_t)
        chunks = min(tiles, max(1, _cdiv(target_programs, N)))
        rows_per_program = _cdiv(tiles, chunks) * block_t
    if num_warps is None:
        num_warps = _floor_pow2(block_t * D // (32 * elems_per_thread))
        if block_t * D > 1.25 * 32 * num_warps * elems_per_thread:  # well over budget: more threads
            num_warps *= 2
        num_warps = min(16, num_warps)
    return LaunchConfig(BLOCK_T=block_t, BLOCK_A=block_a, BLOCK_B=block_b, rows_per_program=rows_per_program,
                        n_chunks=_cdiv(T, rows_per_program), num_warps=num_warps)


BACKWARD_NORM_TILES = dict(target_programs=1024, tile_elems=2048, elems_per_thread=4)  # 1 row x 8 warps
BACKWARD_RESIDUAL_TILES = dict(target_programs=1024, tile_elems=4096, elems_per_thread=16)  # 2 rows x 4 warps


def check_launchable(device):
    """Raise a clear error if the kernels were built for the wrong mode (interpreter vs GPU)."""
    if triton is None:
        raise RuntimeError("the 'triton' package is not installed (pip install triton)")
    if device.type == "cpu" and not KERNELS_INTERPRETED:
        raise RuntimeError("Triton kernels on the CPU need TRITON_INTERPRET=1 set before dit_fast_kernels "
                           "is imported (it was set later, or not at all)")


def last_dim_contiguous(t):
    """t itself when its last dimension has stride 1 (row strides are passed to the kernels)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def modulated_layer_norm_fwd(x, shift, scale, eps, **config_overrides):
    """Triton forward: (out (N, T, D) x.dtype, mean (N, T) fp32, rstd (N, T) fp32)."""
    check_launchable(x.device)
    x, shift, scale = last_dim_contiguous(x), last_dim_contiguous(shift), last_dim_contiguous(scale)
    N, T, D = x.shape
    cfg = launch_config(N, T, D, **config_overrides)
    out = torch.empty((N, T, D), dtype=x.dtype, device=x.device)
    mean = torch.empty((N, T), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _mln_fwd_kernel[(cfg.n_chunks, N)](
        x, shift, scale, out, mean, rstd, T, D, cfg.rows_per_program,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), eps,
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return out, mean, rstd


def modulated_layer_norm_bwd(dout, x, scale, mean, rstd, **config_overrides):
    """Triton backward: (dx x.dtype, dshift, dscale scale.dtype); deterministic (no atomics)."""
    check_launchable(x.device)
    dout, x, scale = last_dim_contiguous(dout), last_dim_contiguous(x), last_dim_contiguous(scale)
    N, T, D = x.shape
    # fewer chunks: smaller partial-sum buffers; one row per tile: two fp32 accumulators per value
    cfg = launch_config(N, T, D, **{**BACKWARD_NORM_TILES, **config_overrides})
    dx = torch.empty((N, T, D), dtype=x.dtype, device=x.device)
    dshift_part = torch.empty((N, cfg.n_chunks, D), dtype=torch.float32, device=x.device)
    dscale_part = torch.empty_like(dshift_part)
    _mln_bwd_kernel[(cfg.n_chunks, N)](
        dout, x, scale, mean, rstd, dx, dshift_part, dscale_part,
        T, D, cfg.rows_per_program, cfg.n_chunks,
        dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), scale.stride(0),
        BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, num_warps=cfg.num_warps,
    )
    return dx, dshift_part.sum(1).to(scale.dtype), dscale_part.sum(1).to(scale.dtype)


def use_triton(device) -> bool:
    """Run the Triton kernels (True) or the reference (False) on ``device``: runtime.triton_status,
    with CUDA (where it is always True once triton imported) answered without its per-call checks."""
    if triton is None:
        return False
    return device.type == "cuda" or triton_status(device)[0]


# ---------------------------------------------------------------------------------------------
# Custom ops: one opaque node for torch.compile, with fake and autograd registrations
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dit_fast::modulated_layer_norm", mutates_args=())
def _mln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x.device):
        return modulated_layer_norm_fwd(x, shift, scale, eps)
    return _forward_ref(x, shift, scale, eps)


@_mln_op.register_fake
def _(x, shift, scale, eps):
    N, T, D = x.shape
    stats = x.new_empty((N, T), dtype=torch.float32)
    return x.new_empty((N, T, D)), stats, torch.empty_like(stats)


@torch.library.custom_op("dit_fast::modulated_layer_norm_backward", mutates_args=())
def _mln_backward_op(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x.device):
        return modulated_layer_norm_bwd(dout, x, scale, mean, rstd)
    return _backward_ref(dout, x, scale, mean, rstd)


@_mln_backward_op.register_fake
def _(dout, x, scale, mean, rstd):
    N, T, D = x.shape
    return x.new_empty((N, T, D)), scale.new_empty((N, D)), scale.new_empty((N, D))


def _setup_context(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype


def _backward(ctx, dout, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _mln_backward_op(dout, x, scale, mean, rstd)
    return dx, dshift.to(ctx.shift_dtype), dscale, None


_mln_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------

def check_modulation(name, x, v):
    """v must be (N, D) for x (N, T, D), on x's device, with unit stride along D."""
    if v.dim() != 2 or v.shape[0] != x.shape[0] or v.shape[1] != x.shape[2]:
        raise ValueError(f"{name} must have shape (N, D) = ({x.shape[0]}, {x.shape[2]}) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}; move them to one device")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")


def check_tokens(name, x):
    """x must be a floating-point (N, T, D) tensor."""
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (N, T, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def modulated_layer_norm(x, shift, scale, eps=1e-6):
    """DiT's ``modulate(LayerNorm(x), shift, scale)`` in one fused pass.

    Args:
        x: (N, T, D) tokens, fp32 / fp16 / bf16 (any strides with unit stride along D are fine).
        shift, scale: (N, D) per-sample modulation, any float dtype; views such as chunks of the
            adaLN output (N, 6D) are used without a copy.
        eps: LayerNorm epsilon (DiT uses 1e-6).
    Returns:
        (N, T, D) in x's dtype: ``LayerNorm(x, no affine, eps) * (1 + scale[:, None]) + shift[:, None]``
        with fp32 statistics. Differentiable w.r.t. x, shift and scale (deterministic backward).
    Runs the Triton kernels on CUDA (or on the CPU under TRITON_INTERPRET=1), the fp32 reference
    otherwise; it is a ``dit_fast::modulated_layer_norm`` custom op, so torch.compile does not break.
    """
    check_tokens("x", x)
    check_modulation("shift", x, shift)
    check_modulation("scale", x, scale)
    return _mln_op(x, shift, scale, float(eps))[0]
