#!/usr/bin/env bash
# Round 6, second call (one H100 or H200, <= 9.8 min): the CUDA tests of serving (issue 17),
# the protein families and embedding (issue 18), the churn tests and auto's small-call rule
# (issue 15); decode and mixed prefill on anyattn's caches (bench serving); the small-call
# sweep with a new packing every call; then the per-family benchmark in the time that is left.
#   OUT=/path bash benchmarks/device_round6_b.sh      # from the repository root
# $OUT: fam/ (the family benchmark's files), misc.tar.gz (everything else), summary.txt.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
OUT=${OUT:-/tmp/out}
M=$OUT/misc
mkdir -p "$M" "$OUT/fam"
T0=$(date +%s)
DEADLINE=${DEADLINE:-575}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git rev-parse --short HEAD 2>/dev/null; } | tee "$OUT/summary.txt"
export ANYATTN_FAILLOG=$M/failures.txt
timeout -k 5 ${TEST_LIMIT:-165} python3 -m pytest -v -m "cuda and not multigpu" -n 12 -p no:cacheprovider --durations=10 \
  tests/test_cuda_serving.py tests/test_cuda_embed.py tests/test_cuda_esmc_ankh.py tests/test_cuda_e1.py tests/test_cuda_churn.py \
  "tests/test_cuda_core.py::test_cuda_auto_prefers_fast_backends" "tests/test_cuda_flash.py::test_varlen_attn_actually_ran_with_the_mapped_arguments" \
  "tests/test_cuda_hf.py::test_generation_matches_hf" "tests/test_cuda_hf.py::test_generation_fp32_auto_equals_sdpa" \
  "tests/test_cuda_hf.py::test_gpt_oss_sinks_within_rule" > "$M/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 ))s: $(grep -c ' PASSED' "$M/tests.log") passed, $(grep -c ' FAILED' "$M/tests.log") failed, $(grep -c ' SKIPPED' "$M/tests.log") skipped" | tee -a "$OUT/summary.txt"
unset ANYATTN_FAILLOG
grep ' FAILED' "$M/tests.log" | sed 's/.*FAILED //' | sort -u | head -30 | tee -a "$OUT/summary.txt"
timeout -s TERM -k 10 75 python3 -m anyattn bench serving --preset h100 --contexts 4096 --steps 12 --impls anyattn/paged,anyattn/contiguous \
  --out "$M/serving_4k" > "$M/serving_4k.log" 2>&1; echo "serving 4k rc=$?" | tee -a "$OUT/summary.txt"
grep -E "^decode" "$M/serving_4k.log" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 10 40 python3 -m anyattn bench serving --preset h100 --mode prefill \
  --out "$M/serving_prefill" > "$M/serving_prefill.log" 2>&1; echo "serving prefill rc=$?" | tee -a "$OUT/summary.txt"
grep -E "^prefill" "$M/serving_prefill.log" | tee -a "$OUT/summary.txt"
timeout -k 5 45 python3 benchmarks/small_calls.py --fresh --sizes 64,2048,4096 --backends sdpa,flash_torch,flex,auto --dense --calls 60 --rounds 3 \
  --out "$M/small_calls_fresh.json" > "$M/small_calls_fresh.log" 2>&1; echo "small calls rc=$?" | tee -a "$OUT/summary.txt"
tail -10 "$M/small_calls_fresh.log" | tee -a "$OUT/summary.txt"
T=$(( $(left) - 15 ))
echo "families: TOTAL=$T" | tee -a "$OUT/summary.txt"
[ "$T" -gt 60 ] && TOTAL=$T OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$M/families.log" 2>&1
tail -30 "$OUT/fam/summary.txt" 2>/dev/null | tee -a "$OUT/summary.txt"
( cd "$OUT" && tar -czf misc.tar.gz misc && rm -rf misc )
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/summary.txt"
