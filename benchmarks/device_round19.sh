#!/usr/bin/env bash
# Round 19, one call (<= ~9.5 min): the CUDA tests and probes a flex / layout change needs to
# land (round 19: the host-built padding BlockMask; next: branch flex-document-tile-ranges), and
# on an H200 issue 15's one-process tables.
#   on an H200: benchmarks/device_round5.sh without its static stage (new packing / new padding
#      every step, host overhead, ESM2-650M plain / compiled / first pass; <= R5_S s), then the
#      CUDA tests of the touched code (churn, core, layout) in what is left of ~570 s;
#   on any other card (where those tables ran in rounds 16-17): the CUDA tests (<= TESTS_S s),
#      then padding_probe.py at 8 x 2048 (host
#      us/call, launches, new-padding steps; <= 90 s), the same for a new packing at 1 x 16384,
#      and host_profile.py (cProfile of the enqueue) for flex and flash_torch
# Everything is written under a work folder and comes back as $OUT/all.tar.gz plus
# $OUT/summary.txt (a call brings back at most 8 files).
#   OUT=/path bash benchmarks/device_round19.sh      # from the repository root
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r19.XXXXXX)
. benchmarks/device_common.sh
TESTS=(tests/test_cuda_churn.py tests/test_cuda_core.py tests/test_layout.py)
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  SKIP_KERNELS=1 OUT=$OUT/r5 timeout -s TERM -k 5 "${R5_S:-400}" bash benchmarks/device_round5.sh > "$OUT/round5.log" 2>&1
  echo "round5 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  cp /tmp/round5.*/logs.txt "$OUT/round5_work_logs.txt" 2>/dev/null
  left=$(( 570 - $(el) )); [ "$left" -lt 30 ] && left=30  # what is left of the call (a cold compile cache needs ~190 s)
  cuda_tests "$left" "${TESTS[@]}"
else
  cuda_tests "${TESTS_S:-240}" "${TESTS[@]}"  # ~185 s on a fresh machine (round 19), ~95 s warm
  timeout -s TERM -k 5 90 python3 benchmarks/padding_probe.py --shape 8x2048 > "$OUT/probe_8x2048.log" 2>&1
  echo "probe 8x2048 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  timeout -s TERM -k 5 90 python3 benchmarks/padding_probe.py --parts b --case packing --shape 1x16384 > "$OUT/probe_packing.log" 2>&1
  echo "probe packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  for g in "" "--grad"; do
    timeout -s TERM -k 5 60 python3 benchmarks/host_profile.py --backends flex,flash_torch $g --out "$OUT" > /dev/null 2>&1
  done
  timeout -s TERM -k 5 60 python3 benchmarks/host_profile.py --case packing --shape 1x16384 --backends flex,flash_torch --out "$OUT" > /dev/null 2>&1
  echo "host profiles at $(el)s" | tee -a "$OUT/summary.txt"
fi
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
[ -f "$OUT/probe_8x2048.log" ] && grep -h "  flex\|  flash_torch\|  auto\|  raw\|  sdpa" "$OUT/probe_8x2048.log" "$OUT/probe_packing.log" | cut -c1-120 | tail -40
tail -30 "$OUT/r5/summary.txt" 2>/dev/null
