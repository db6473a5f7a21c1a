#!/usr/bin/env bash
# Round 18, second call (<= 6 min, any card): CPU lengths / keep-masks now reach the GPU through
# pinned memory everywhere (spec.base.to_device); (1) the CUDA tests of what that touches
# (churn with the empty-row test, core, serving; <= 170 s) -> $OUT/tests.log; (2) padding_probe.py
# with pinned and pageable copies side by side: part A (host) + new padding 8 x 2048, then new
# packing 1 x 16384 -> $OUT/probe_*.log.
#   OUT=/path bash benchmarks/device_round18_b.sh      # from the repository root
. benchmarks/device_common.sh
cuda_tests 170 tests/test_cuda_churn.py tests/test_cuda_core.py tests/test_cuda_serving.py
timeout -s TERM -k 5 100 python3 benchmarks/padding_probe.py --shape 8x2048 > "$OUT/probe_8x2048.log" 2>&1
echo "probe 8x2048 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 80 python3 benchmarks/padding_probe.py --parts b --case packing --shape 1x16384 > "$OUT/probe_pack.log" 2>&1
echo "probe packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
cat "$OUT/probe_8x2048.log" "$OUT/probe_pack.log" | grep -v "^W1\|^USDT\|_warn_once\|UserWarning" | cut -c1-150 | tail -75
