#!/usr/bin/env bash
# The whole GPU run in one command (`make gpu-check`): bf16 / full-shape correctness tests, kernel
# benchmarks, the training table (DiT-XL/2, 256 px, batch 128) and the sampling benchmark.
# Results go to $OUT (default ./gpu-results), at most 8 files:
#   env.txt  gpu_tests.txt  kernels.json  table-<gpu>-<date>.{json,csv,md}  sampling.json  log.txt
# Every step runs even if an earlier one failed (no `set -e`); the timeouts add up to < 9 minutes.
# Ordered by what matters most if the device time runs out: table, sampling, correctness, kernel timings.
# The machine needs only the repository: wheels for DeepSpeed / diffusers are taken from .whl/ when
# present (put the wheels there beforehand: the GPU machine has no network), installed into .site/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
start=$(date +%s)
step() { echo "=== [$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }

# 1. Python path (and the wheels the GPU machine lacks)
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  step "installing .whl/ into .site/"
  if python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$PWD/.site:$PYTHONPATH"
  else
    echo "pip install of .whl/ failed: the DeepSpeed / VAE rows will be skipped" | tee -a "$LOG"
  fi
fi
export DIT_FAST_COMMIT=${DIT_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || cat .commit 2>/dev/null || echo unknown)}

# 2. The machine and the versions
step "environment -> env.txt"
{
  date -u; echo "commit: $DIT_FAST_COMMIT"; echo
  nvidia-smi 2>&1
  python3 - <<'EOF' 2>&1
import importlib.metadata as md, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "deepspeed", "diffusers", "pytest", "pytest-benchmark"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
} >"$OUT/env.txt" 2>&1

# 3. The training table; rows that would start after 150 s are marked skipped, files are rewritten
#    after every row, so a timeout still leaves the finished rows.
step "training table -> table-*.{json,csv,md}"
timeout -k 10 210 python3 benchmarks/table.py --out "$OUT" --max-seconds 150 2>>"$LOG" | tee -a "$LOG"

# 4. Sampling benchmark (its own file; skipped if it is not there yet)
if [ -f benchmarks/test_bench_sampling.py ]; then
  step "sampling benchmark -> sampling.json"
  timeout -k 10 120 python3 -m pytest -q benchmarks/test_bench_sampling.py --benchmark-json "$OUT/sampling.json" \
    >>"$LOG" 2>&1
  echo "exit $?" >>"$LOG"
else
  step "benchmarks/test_bench_sampling.py is missing: sampling benchmark skipped"
fi
# 5. Correctness on the GPU (bf16, full shapes): kernels and model parity
step "GPU tests -> gpu_tests.txt"
timeout -k 10 120 python3 -m pytest -q -k "gpu or cuda" tests/kernels tests/test_fast_paths.py tests/test_sampling.py \
  tests/test_sample_cli.py tests/diffusion 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5 | tee -a "$LOG"

# 6. Kernel benchmarks against eager / torch.compile / SDPA
step "kernel benchmarks -> kernels.json"
timeout -k 10 90 python3 -m pytest -q benchmarks/test_bench_adaln.py benchmarks/test_bench_attention.py \
  --benchmark-json "$OUT/kernels.json" >>"$LOG" 2>&1
echo "exit $?" >>"$LOG"

step "done"
ls -la "$OUT" >>"$LOG"
