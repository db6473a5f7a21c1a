#!/usr/bin/env bash
# Round 18, first call (<= 8 min): on an H200, issue 15's one-process tables (device_round5.sh:
# new packing / new padding every step, host overhead, static subset, ESM2-650M; <= R5_S s) -> $OUT/r5;
# on any card, benchmarks/padding_probe.py (where a new padding every call spends its time:
# host syncs, launches, kernel time; 8 x 2048 and 2 x 8192) -> $OUT/probe_*.
#   OUT=/path bash benchmarks/device_round18.sh      # from the repository root
. benchmarks/device_common.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  OUT=$OUT/r5 timeout -s TERM -k 5 "${R5_S:-300}" bash benchmarks/device_round5.sh > "$OUT/round5.log" 2>&1
  echo "round5 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  tail -40 "$OUT/r5/summary.txt" 2>/dev/null
fi
timeout -s TERM -k 5 150 python3 benchmarks/padding_probe.py --shape 8x2048 --out "$OUT/probe_8x2048" > "$OUT/probe_8x2048.log" 2>&1
echo "probe 8x2048 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 100 python3 benchmarks/padding_probe.py --parts b --shape 2x8192 --out "$OUT/probe_2x8192" > "$OUT/probe_2x8192.log" 2>&1
echo "probe 2x8192 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
cat "$OUT/probe_8x2048.log" "$OUT/probe_2x8192.log" | grep -v "^W1\|^USDT" | cut -c1-170 | tail -45
