#!/usr/bin/env bash
# Round 24, one call (<= ~9.5 min): the CUDA tests of the paths the round-24 audits changed on
# the CPU (KV caches zeroing handed-out slots and refusing stale steps, SDPA settling lowerings
# only without gradients, value-keyed tensors copied before lowering, HF static-cache masks,
# checkpointing around first-use masks, nn/decoder on empty sequences), plus the core and churn
# tests they share. Everything comes back as $OUT/all.tar.gz plus $OUT/summary.txt.
#   OUT=/path bash benchmarks/device_round24.sh      # from the repository root
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r24.XXXXXX)
. benchmarks/device_common.sh
cuda_tests "${TESTS_S:-540}" tests/test_cuda_serving.py tests/test_cuda_train.py tests/test_cuda_hf.py \
  tests/test_cuda_churn.py tests/test_cuda_core.py
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
tail -25 "$OUT/tests.log"
