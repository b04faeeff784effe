#!/usr/bin/env bash
# The whole GPU run in one command (`make gpu-check`), <= 9 minutes, everything under $OUT
# (default ./gpu-results):
#   env.txt  gpu_tests.txt + gpu_tests.xml (pass/fail of every GPU test)  table-<gpu>-<date>.{json,csv,md}
#   sampling.json  adaln.jsonl (+ adaln.json)  log.txt
# Ordered by what matters if the device time runs out:
#   1. every GPU test (trainer: fp16 loss scaling, bf16 + ZeRO-2 + compile + ckpt, the EMA of the fp16/bf16
#      master; model parity; sampling; kernels), pass/fail list                       timeout 190 s
#   2. the training table through train.py's step: DiT-XL/2, 256 px, batch 128, bf16; no ckpt / full /
#      selective, each eager and compiled with inductor's or the fused adaLN; then both baselines
#      (rows not started by 150 s are marked skipped; the files are rewritten after every row)  170 s
#   3. sampling through sample.py's Sampler (DiT-XL/2, CFG, bf16 eager and compiled)  80 s
#   4. adaLN kernel device times (CUDA-graph replay, fwd and bwd launcher)                 70 s
#   5. the objectives: DiT's diffusion vs --objective flow vs --repa (random DINOv2-B)  100 s
#   6. evaluation cost: 2015 Inception features/s, Frechet distances, precision/recall   40 s
# The timeouts add up to 650 s (steps 5-6 are last: they run only if the device budget allows). Every step runs even if an earlier one failed (no `set -e`); pytest steps
# get SIGINT at their timeout, so they still print their summary and write their XML/JSON.
# The machine has no network: the wheels for DeepSpeed / diffusers come from .whl/ (filled beforehand,
# e.g. by the project's wheels script), installed into .site/ first.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
start=$(date +%s)
step() { echo "=== [$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }
# run SECONDS CMD...: SIGINT at the limit (pytest then reports and writes its files), KILL 10 s later
run() { local limit=$1; shift; timeout -s INT -k 10 "$limit" "$@"; local rc=$?; echo "exit $rc" >>"$LOG"; return $rc; }

# 0. Python path and the wheels the GPU machine lacks (DeepSpeed must import for the trainer's tests and rows)
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  step "installing .whl/ into .site/"
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl >>"$LOG" 2>&1 \
    || echo "pip install of .whl/ failed" | tee -a "$LOG"
  export PYTHONPATH="$PWD/.site:$PYTHONPATH"
else
  step "no .whl/ wheels: DeepSpeed / diffusers must already be installed"
fi
export DIT_FAST_COMMIT=${DIT_FAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || cat .commit 2>/dev/null || echo unknown)}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # reserved stays near allocated
export ADALN_BENCH_JSONL="$OUT/adaln.jsonl"

step "environment -> env.txt (commit $DIT_FAST_COMMIT)"
{
  date -u; echo "commit: $DIT_FAST_COMMIT"; echo "PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"; echo
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
import deepspeed  # noqa: F401  (the trainer's tests and every table row need it)
print("deepspeed imports from", deepspeed.__file__)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
} >"$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt" | tee -a "$LOG"

step "1. GPU tests (trainer first, then model parity, sampling, kernels) -> gpu_tests.txt, gpu_tests.xml"
run 190 python3 -m pytest -v -rA -p no:cacheprovider -k "gpu or cuda" --junitxml "$OUT/gpu_tests.xml" \
  tests/test_train_gpu.py tests/test_train_ema.py tests/test_fast_paths.py tests/sampling \
  tests/diffusion tests/kernels >"$OUT/gpu_tests.txt" 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt" | tail -4 | tee -a "$LOG"

step "2. training table through train.py's step -> table-*.{json,csv,md}"
run 170 python3 benchmarks/table.py --out "$OUT" --max-seconds 150 --rows \
mp_feat,ckpt_mp_feat,selective,nockpt_compile,nockpt_compile_fused,compile,compile_fused,selective_compile,\
selective_compile_fused,original_math,original_sdpa 2>>"$LOG" | tee -a "$LOG"

step "3. sampling through sample.py's Sampler -> sampling.json"
run 80 python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_sampling.py -k "gpu and bf16" \
  --benchmark-json "$OUT/sampling.json" >>"$LOG" 2>&1

step "4. adaLN kernel device times (fwd, bwd launcher) -> adaln.jsonl, adaln.json"
run 70 python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_adaln.py \
  -k "not sweep and not test_forward_backward" --benchmark-json "$OUT/adaln.json" >>"$LOG" 2>&1

step "5. objectives through train.py's step: DiT's diffusion vs --objective flow vs --repa -> objectives/"
run 100 python3 benchmarks/table.py --out "$OUT/objectives" --max-seconds 85 --rows \
mp_feat,flow_nockpt,ckpt_mp_feat,flow,repa_base,repa 2>>"$LOG" | tee -a "$LOG"

step "6. evaluation cost (2015 Inception features/s, Frechet, precision/recall) -> eval_cost.txt"
run 40 python3 benchmarks/eval_cost.py --device cuda --images 1024 >"$OUT/eval_cost.txt" 2>>"$LOG"

step "done"
ls -la "$OUT" >>"$LOG"
