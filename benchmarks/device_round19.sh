#!/usr/bin/env bash
# Round 19, one call (<= ~9.5 min): lands the host-built flex padding BlockMask and, on an H200,
# re-runs issue 15's one-process tables.
#   1. the CUDA tests of the touched code (churn, core; <= 120 s)
#   2. on an H200: benchmarks/device_round5.sh without its static stage (new packing / new
#      padding every step, host overhead, ESM2-650M plain / compiled / first pass; <= R5_S s);
#      on any other card (where those ran in rounds 16-17): padding_probe.py at 8 x 2048 (host
#      us/call, launches, new-padding steps; <= 90 s)
# Everything is written under a work folder and comes back as $OUT/all.tar.gz plus
# $OUT/summary.txt (a call brings back at most 8 files).
#   OUT=/path bash benchmarks/device_round19.sh      # from the repository root
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r19.XXXXXX)
. benchmarks/device_common.sh
cuda_tests 120 tests/test_cuda_churn.py tests/test_cuda_core.py
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  SKIP_KERNELS=1 OUT=$OUT/r5 timeout -s TERM -k 5 "${R5_S:-420}" bash benchmarks/device_round5.sh > "$OUT/round5.log" 2>&1
  echo "round5 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  cp /tmp/round5.*/logs.txt "$OUT/round5_work_logs.txt" 2>/dev/null
else
  timeout -s TERM -k 5 90 python3 benchmarks/padding_probe.py --shape 8x2048 > "$OUT/probe_8x2048.log" 2>&1
  echo "probe 8x2048 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
fi
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
[ -f "$OUT/probe_8x2048.log" ] && grep -v "^W1\|^USDT\|_warn_once\|UserWarning" "$OUT/probe_8x2048.log" | cut -c1-150 | tail -30
tail -30 "$OUT/r5/summary.txt" 2>/dev/null
