#!/usr/bin/env bash
# Round 17, a short last call (<= ~6 min): on an H200, issue 15's one-process tables
# (benchmarks/device_round5.sh: new packing / new padding every step, host overhead, the static
# headline subset, ESM2-650M plain / compiled / first pass next to HF sdpa and the port; no tests)
# -> $OUT/r5; on an H100 (which measured those in rounds 16-17), the ESM2-650M stage of the family
# benchmark with the current tree -> $OUT/fam.
#   OUT=/path bash benchmarks/device_round17_c.sh      # from the repository root
. benchmarks/device_common.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  OUT=$OUT/r5 timeout -s TERM -k 5 "${R5_S:-330}" bash benchmarks/device_round5.sh > "$OUT/round5.log" 2>&1
  echo "round5 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  tail -40 "$OUT/r5/summary.txt" 2>/dev/null
  exit 0
fi
STAGES="esm2" TOTAL=${FAM_S:-200} OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$OUT/fam.log" 2>&1
echo "families rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
cut -c1-170 "$OUT/fam/summary.txt" 2>/dev/null
