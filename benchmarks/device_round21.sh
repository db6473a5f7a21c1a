#!/usr/bin/env bash
# Round 21, one call (<= ~9.5 min). On an H200: benchmarks/device_round19.sh (issue 15's
# one-process tables, then the CUDA churn / core / layout tests). On any other card:
#   1. the CUDA tests of flex's softcap (tanh.approx.f32, with the caller-graph gradient checks
#      added after round 20) and the training-loop tests with softcap (<= TESTS_S s);
#   2. benchmarks/flex_config_probe.py: flex's Triton kernel options (TMA, the row / block
#      guarantees, tile shapes) on causal and softcap at 1 x 16 x 16384 x 128, forward and
#      forward+backward, next to cuDNN causal (<= PROBE_S s).
# Everything comes back as $OUT/all.tar.gz plus $OUT/summary.txt.
#   OUT=/path bash benchmarks/device_round21.sh      # from the repository root
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash benchmarks/device_round19.sh
fi
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r21.XXXXXX)
. benchmarks/device_common.sh
cuda_tests "${TESTS_S:-150}" tests/test_cuda_core.py tests/test_cuda_train.py -k "softcap or tanh"
left=$(( 560 - $(el) )); [ "$left" -lt 60 ] && left=60
timeout -s TERM -k 5 "${PROBE_S:-$left}" python3 benchmarks/flex_config_probe.py --variants softcap,causal --deadline $(( left - 40 )) --out "$OUT" > "$OUT/config_probe.log" 2>&1
echo "config probe rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
tail -40 "$OUT/config_probe.log"
