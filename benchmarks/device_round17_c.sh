#!/usr/bin/env bash
# Round 17, third call (<= 9 min): on an H200, issue 15's one-process tables and issue 17's decode
# table (benchmarks/device_round14_all.sh, DEADLINE default 520); on an H100 (which measured those
# in rounds 16-17), the ESM2-650M and embed stages of the family benchmark with the current tree
# (plain call, compiled, first pass, HF sdpa, FastPLMs-style port; `anyattn embed` end to end) -> $OUT/fam.
#   OUT=/path bash benchmarks/device_round17_c.sh      # from the repository root
. benchmarks/device_common.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  DEADLINE=${DEADLINE:-520} bash benchmarks/device_round14_all.sh
  exit $?
fi
STAGES="esm2 embed" TOTAL=${FAM_S:-330} OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$OUT/fam.log" 2>&1
echo "families rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
cat "$OUT/fam/summary.txt" 2>/dev/null | cut -c1-170
