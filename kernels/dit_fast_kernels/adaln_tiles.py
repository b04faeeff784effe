"""Shared by the adaLN kernels (modulated_layer_norm.py, gated_residual.py, gated_residual_norm.py): the
Triton tile helpers, the launch configurations of both layouts (every tuned number in one place, with
its evidence), and the input checks.

A row of D values is held in registers as two power-of-two column blocks (see ``column_blocks``); a
program owns consecutive tokens of one sample. ``layout`` picks the tiling: "tiles" (several rows x
several warps per tile, the tuned default) or "rows" (one row per tile in as few warps as hold it,
next-tile prefetch, a one-wave grid). This module never imports dit_fast.
"""
import functools
import os
import types

import torch

from dit_fast_kernels.runtime import triton_status

try:  # Triton is optional: without it the ops run the reference.
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
LAYOUTS = ("tiles", "rows")
DEFAULT_LAYOUT = "tiles"  # "rows" waits for an H200 run of benchmarks/test_bench_adaln.py to win


# ---------------------------------------------------------------------------------------------
# Tile helpers (@triton.jit, inlined into the kernels)
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
def store_vector(PTR, offset, cols, value, D):
    """A (len(cols),) fp32 vector (a 1-D accumulator) at PTR + offset + cols, up to D."""
    tl.store(PTR + offset + cols, value, mask=cols < D)


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
def load_rows(PTR, base, rows, stride_t, ca, cb, t_end, D):
    """fp32 tiles (rows x A, rows x B) at PTR + base + rows * stride_t; 0 past t_end and past D."""
    row_ok = (rows < t_end)[:, None]
    offsets = base + rows * stride_t
    return load_tile(PTR, offsets, ca, row_ok), load_tile(PTR, offsets, cb, row_ok & (cb < D)[None, :])


@jit
def load_row_stats(PTR, base, rows, t_end):
    """fp32 per-row statistic (mean or rstd) at PTR + base + rows, 0 past t_end."""
    return tl.load(PTR + base + rows, mask=rows < t_end, other=0.0)


# ---------------------------------------------------------------------------------------------
# Launch configurations
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


# "tiles" layout: forward defaults are launch_config's own (4 rows x 4 warps at D = 1152); backward:
BACKWARD_NORM_TILES = dict(target_programs=1024, tile_elems=2048, elems_per_thread=4)  # 1 row x 8 warps
BACKWARD_RESIDUAL_TILES = dict(target_programs=1024, tile_elems=4096, elems_per_thread=16)  # 2 rows x 4 warps
# "rows" layout: ~1K values per warp per tile (D = 1152: one row), a one-wave grid of programs_per_sm x
# SMs. num_warps and programs_per_sm come from an offline sm_90 compile (triton 3.9, D = 1152, fp32 or
# bf16 x, bf16 m; tests/kernels/sm90_resources.py): the fewest warps that do not spill, and about as
# many programs as fit an SM by registers. Forward 1 warp: 102-114 registers, no barrier, 128-bit loads,
# ~17 resident. Backward 1 warp spills (255 registers + stack: x, dm, their prefetch and two (D,)
# accumulators); 2 warps: 187-211 registers, ~4 resident. Starting points for the H200 sweep, not
# measurements.
ROWS_FORWARD = dict(tile_elems=1024, num_warps=1, programs_per_sm=16)
ROWS_BACKWARD = dict(tile_elems=2048, num_warps=2, programs_per_sm=4)
# rows layout of the fused residual + norm (gated_residual_norm.py): x and y (and their prefetch)
# spill one warp in the bf16 forward, so 2 warps (96-113 registers, ~8 resident); the backward (h, dm,
# their prefetch, y, dh, three (D,) accumulators) needs 2 warps too (204-217 registers, ~4 resident)
ROWS_RESIDUAL_FORWARD = dict(tile_elems=2048, num_warps=2, programs_per_sm=8)
ROWS_RESIDUAL_BACKWARD = dict(tile_elems=2048, num_warps=2, programs_per_sm=4)
CPU_SM_COUNT = 4  # the interpreter has no SMs; a few programs, each looping over many rows


@functools.cache
def _sm_count(device_type, index):
    if device_type != "cuda":
        return CPU_SM_COUNT
    return torch.cuda.get_device_properties(index).multi_processor_count


def check_layout(layout):
    """``layout`` or the default; raise on an unknown name."""
    layout = DEFAULT_LAYOUT if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} (or None for {DEFAULT_LAYOUT!r}), got {layout!r}")
    return layout


def layout_config(layout, device, N, T, D, tiles_defaults, rows_defaults, overrides):
    """launch_config for ``layout``: the tuned tile heuristics, or the rows layout's one-warp one-wave
    grid (``programs_per_sm`` x the device's SM count programs unless ``target_programs`` is given)."""
    if check_layout(layout) == "tiles":
        return launch_config(N, T, D, **{**tiles_defaults, **overrides})
    opts = {**rows_defaults, **overrides}
    per_sm = opts.pop("programs_per_sm")
    if "target_programs" not in opts:
        device = torch.device(device)
        opts["target_programs"] = per_sm * _sm_count(device.type, device.index or 0)
    return launch_config(N, T, D, **opts)


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


def adaln_op(name):
    """Decorator registering an adaLN op: ``torch.library.triton_op`` (torch.compile traces the body, so
    inductor sees the wrap_triton launches), or a plain ``custom_op`` where triton is not installed (the
    body then only ever runs the reference, and triton_op would warn once per op at import)."""
    if triton is None:
        return torch.library.custom_op(name, mutates_args=())
    return torch.library.triton_op(name, mutates_args=())


def traced(t) -> bool:
    """True when ``t`` stands in for a tensor while torch.compile / export trace (a fake or functional
    tensor, or another subclass), False for a plain tensor. Launches for plain tensors call the kernel
    directly: through wrap_triton, an eager call would go through the tracing machinery (a higher-order
    op, and a new side-table entry per call because of the num_warps config)."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) or torch._is_functional_tensor(t)


def use_triton(device) -> bool:
    """Run the Triton kernels (True) or the reference (False) on ``device``: runtime.triton_status,
    with CUDA (where it is always True once triton imported) answered without its per-call checks."""
    if triton is None:
        return False
    return device.type == "cuda" or triton_status(device)[0]


# ---------------------------------------------------------------------------------------------
# Input checks of the public functions
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


def check_out_dtype(out_dtype):
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
