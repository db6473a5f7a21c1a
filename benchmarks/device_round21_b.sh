#!/usr/bin/env bash
# Round 21 b, one call (<= ~9.5 min): flex's kernel guarantees (flex_blocks.kernel_guarantees:
# ROWS_GUARANTEED_SAFE / BLOCKS_ARE_CONTIGUOUS for plain causal and unmasked calls; ran in round 21
# from their branch, merged since).
# On an H200: benchmarks/device_round19.sh (issue 15's one-process tables, then the CUDA churn /
# core / layout tests, which hold the guarantee tests). On any other card:
#   1. the CUDA tests of the touched code: core (the guarantee tests against float64), churn,
#      train (causal flex inside compiled training steps) (<= TESTS_S s);
#   2. anyattn bench kernels --preset h200 on causal, softcap, alibi and dense: anyattn flex (with
#      the guarantees) next to raw compiled flex (torch's defaults) and cuDNN (<= the rest).
# Everything comes back as $OUT/all.tar.gz plus $OUT/summary.txt.
#   OUT=/path bash benchmarks/device_round21_b.sh      # from the repository root
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash benchmarks/device_round19.sh
fi
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r21b.XXXXXX)
. benchmarks/device_common.sh
cuda_tests "${TESTS_S:-300}" tests/test_cuda_core.py tests/test_cuda_churn.py tests/test_cuda_train.py
left=$(( 555 - $(el) )); [ "$left" -lt 60 ] && left=60
timeout -s TERM -k 5 "$left" python3 -m anyattn bench kernels --preset h200 --variants causal,softcap,alibi,dense \
  --backends cudnn,flex,raw:flex --budget-s $(( left - 25 )) --no-progress --out "$OUT/k" > "$OUT/kernels.log" 2>&1
echo "bench kernels rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
tail -30 "$OUT/kernels.log"
