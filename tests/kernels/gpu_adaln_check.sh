#!/usr/bin/env bash
# Issue #12's kernel levers on one GPU, in one command (about 6-9 minutes on an H200; the timeouts add
# up to 10): bf16 / full-shape correctness of both layouts and of out_dtype first, then device times.
# Results in $OUT (default ./gpu-results-adaln):
#   env.txt  gpu_tests.txt  adaln.jsonl (one line per benchmark case, written as each finishes)
#   adaln.json (pytest-benchmark, only if the run was not cut short)  summary.txt  log.txt
# Every step runs even if an earlier one failed. Nothing here asserts a speed.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-results-adaln}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export DIT_FAST_COMMIT=${DIT_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export ADALN_BENCH_JSONL="$OUT/adaln.jsonl"
LOG="$OUT/log.txt"
start=$(date +%s)
step() { echo "=== [$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }

step "environment -> env.txt"
{ date -u; echo "commit: $DIT_FAST_COMMIT"; nvidia-smi 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1

step "GPU correctness: both layouts, out_dtype=bf16 == autocast's cast, inductor sees the kernels -> gpu_tests.txt"
timeout -k 10 180 python3 -m pytest -q -k "gpu" tests/kernels/test_modulated_layer_norm.py \
  tests/kernels/test_gated_residual.py >"$OUT/gpu_tests.txt" 2>&1
tail -3 "$OUT/gpu_tests.txt" | tee -a "$LOG"

step "device times: every op x precision x implementation, fwd / fwd+bwd / bwd launcher -> adaln.jsonl, adaln.json"
timeout -k 10 300 python3 -m pytest -q benchmarks/test_bench_adaln.py -k "not sweep" \
  --benchmark-json "$OUT/adaln.json" >>"$LOG" 2>&1
echo "exit $?" >>"$LOG"

step "tiling sweep of both layouts -> adaln.jsonl"
timeout -k 10 120 python3 -m pytest -q benchmarks/test_bench_adaln.py -k "sweep" >>"$LOG" 2>&1
echo "exit $?" >>"$LOG"

step "summary -> summary.txt"
python3 - "$ADALN_BENCH_JSONL" >"$OUT/summary.txt" 2>&1 <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])] if len(sys.argv) > 1 else []
for r in sorted(rows, key=lambda r: (r["op"], r["direction"], r["precision"], r["us"])):
    print(f'{r["op"]:4s} {r["direction"]:8s} {r["precision"]:12s} {r["impl"]:28s} {r["us"]:8.1f} us '
          f'{r["gb_per_s"]:6.0f} GB/s  ({r["timer"]})')
PY
cat "$OUT/summary.txt" | tee -a "$LOG" | head -80
step "done"
