#!/usr/bin/env bash
# Round 18, a short call (<= 4 min, any card) for little device time: the CUDA tests of this
# round's changes (churn with the empty-row test, core; <= 130 s) -> $OUT/tests.log, then
# padding_probe.py at 8 x 2048, pinned vs pageable copies (<= 90 s) -> $OUT/probe_8x2048.log.
#   OUT=/path bash benchmarks/device_round18_c.sh      # from the repository root
. benchmarks/device_common.sh
cuda_tests 130 tests/test_cuda_churn.py tests/test_cuda_core.py
timeout -s TERM -k 5 90 python3 benchmarks/padding_probe.py --shape 8x2048 > "$OUT/probe_8x2048.log" 2>&1
echo "probe 8x2048 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
grep -v "^W1\|^USDT\|_warn_once\|UserWarning" "$OUT/probe_8x2048.log" | cut -c1-150 | tail -40
