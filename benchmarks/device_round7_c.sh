#!/usr/bin/env bash
# Round 7, third call (one H100 or H200, <= 9.8 min): the CUDA tests of the model families, embed
# and training, then the family benchmark stages the previous round did not reach (ANKH, embed
# end to end, E1, DPLM, ANKH-large) in the time that is left.
#   OUT=/path bash benchmarks/device_round7_c.sh      # from the repository root
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/fam"
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/summary.txt"
export ANYATTN_FAILLOG=$OUT/failures.txt
timeout -k 5 ${TEST_LIMIT:-200} python3 -m pytest -q -rf -m "cuda and not multigpu" -n 14 -p no:cacheprovider \
  tests/test_cuda_models.py tests/test_cuda_dplm.py tests/test_cuda_e1.py tests/test_cuda_embed.py tests/test_cuda_esmc_ankh.py \
  tests/test_cuda_train.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 ))s: $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
unset ANYATTN_FAILLOG
grep -E '^FAILED|^ERROR' "$OUT/tests.log" | cut -c1-250 | head -20 | tee -a "$OUT/summary.txt"
T=$(( DEADLINE - ($(date +%s) - T0) - 10 ))
echo "families: TOTAL=$T" | tee -a "$OUT/summary.txt"
[ "$T" -gt 60 ] && STAGES="${STAGES:-ankh_base embed e1 dplm ankh_large}" TOTAL=$T OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$OUT/families.log" 2>&1
tail -40 "$OUT/fam/summary.txt" 2>/dev/null | tee -a "$OUT/summary.txt"
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/summary.txt"
