"""Registers, spills and barriers of the adaLN kernels compiled offline for sm_90 (no GPU needed).

Triton's bundled ptxas/cuobjdump compile the kernels as the runtime would specialize them at DiT-XL's
D = 1152 (16-byte aligned pointers; D, T, strides divisible by 16) and report per kernel and launch
config: registers per thread, stack (spill) bytes, bar.sync count in the PTX and 128-bit global loads.
The launch configs are the launchers' own defaults for each layout, plus any extra num_warps asked for.
Run (TRITON_INTERPRET must be unset: interpreted kernels cannot be compiled):
    PYTHONPATH=.:kernels python tests/kernels/sm90_resources.py [--x-dtype fp32] [--warps 1 2 4]
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

D, T = 1152, 256


def _compile(fn, ptr_types, consts, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, aligned = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = "*" + ptr_types[name]
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
        if name in ptr_types or name in ("T", "D", "rows_per_program") or name.startswith("stride"):
            aligned[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=consts, attrs=aligned)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    ptx = kernel.asm["ptx"].splitlines()
    return dict(regs=int(re.search(r"REG:(\d+)", usage).group(1)), stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
                bar_sync=sum("bar.sync" in line or "barrier.sync" in line for line in ptx),
                ld_v4=sum("ld.global" in line and ".v4" in line for line in ptx))


def kernel_table(x_dtype="fp32", extra_warps=()):
    """[(name, layout, num_warps, BLOCK_T, usage)] for the four norm kernels x both layouts."""
    mln = importlib.import_module("dit_fast_kernels.modulated_layer_norm")
    grn = importlib.import_module("dit_fast_kernels.gated_residual_norm")
    cfgs = importlib.import_module("dit_fast_kernels.adaln_tiles")
    bf, f32 = "bf16", "fp32"
    stats = dict(MEAN=f32, RSTD=f32)
    kernels = {  # name: (kernels per layout, pointer dtypes, tiles defaults, rows defaults, extra constexprs)
        "mln_fwd": ({"tiles": mln._mln_fwd_kernel, "rows": mln._mln_fwd_rows_kernel},
                    dict(X=x_dtype, SHIFT=bf, SCALE=bf, OUT=bf, **stats), {}, cfgs.ROWS_FORWARD, {}),
        "mln_bwd": ({"tiles": mln._mln_bwd_kernel, "rows": mln._mln_bwd_rows_kernel},
                    dict(DOUT=bf, X=x_dtype, SCALE=bf, DX=x_dtype, DSHIFT_PART=f32, DSCALE_PART=f32, **stats),
                    cfgs.BACKWARD_NORM_TILES, cfgs.ROWS_BACKWARD, {}),
        "grn_fwd": ({"tiles": grn._residual_norm_fwd_kernel, "rows": grn._residual_norm_fwd_rows_kernel},
                    dict(X=x_dtype, GATE=bf, Y=bf, SHIFT=bf, SCALE=bf, H=x_dtype, M=bf, **stats), {},
                    cfgs.ROWS_RESIDUAL_FORWARD, {}),
        "grn_bwd": ({"tiles": grn._residual_norm_bwd_kernel, "rows": grn._residual_norm_bwd_rows_kernel},
                    dict(DH=x_dtype, DM=bf, H=x_dtype, GATE=bf, Y=bf, SCALE=bf, DX=x_dtype, DY=bf, DGATE_PART=f32,
                         DSHIFT_PART=f32, DSCALE_PART=f32, **stats),
                    cfgs.BACKWARD_RESIDUAL_TILES, cfgs.ROWS_RESIDUAL_BACKWARD, dict(HAS_DH=True)),
    }
    rows = []
    for name, (fns, ptrs, tiles_defaults, rows_defaults, extra) in kernels.items():
        for layout, fn in fns.items():
            cfg = cfgs.layout_config(layout, "cpu", 128, T, D, tiles_defaults, rows_defaults, {})
            consts = dict(BLOCK_T=cfg.BLOCK_T, BLOCK_A=cfg.BLOCK_A, BLOCK_B=cfg.BLOCK_B, **extra)
            for num_warps in dict.fromkeys([cfg.num_warps, *extra_warps]):
                rows.append((name, layout, num_warps, cfg.BLOCK_T, num_warps == cfg.num_warps,
                             _compile(fn, ptrs, consts, num_warps)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="dtype of x / h / dx (fp32: the model's residual stream under autocast)")
    parser.add_argument("--warps", type=int, nargs="*", default=(), help="extra num_warps to compile")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    for name, layout, num_warps, block_t, default, usage in kernel_table(args.x_dtype, args.warps):
        if args.json:
            print(json.dumps(dict(kernel=name, layout=layout, num_warps=num_warps, block_t=block_t,
                                  default=default, x_dtype=args.x_dtype, **usage)))
        else:
            print(f"{name:8s} {layout:5s} T{block_t}w{num_warps}{' (default)' if default else '          '}  "
                  f"regs {usage['regs']:3d}  stack {usage['stack']:4d} B  bar.sync {usage['bar_sync']:3d}  "
                  f"ld.v4 {usage['ld_v4']:3d}")


if __name__ == "__main__":
    main()
