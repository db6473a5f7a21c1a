#!/usr/bin/env bash
# Round 17, a last call with little device time left (<= ~2.5 min): issue 15's dynamic-path
# tables on an H200 only (new packing / new padding every step, then host overhead; one process
# each) -> $OUT/new_packing, $OUT/host; on any other card it prints the card and stops (those
# tables ran on H100s in rounds 16 and 17).
#   OUT=/path bash benchmarks/device_round17_d.sh      # from the repository root
. benchmarks/device_common.sh
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200: nothing run"; exit 0; }
timeout -s TERM -k 5 100 python3 -m anyattn bench kernels --mode new-packing --steps 50 --budget-s 80 --no-progress \
  --out "$OUT/new_packing" > "$OUT/new_packing.log" 2>&1
echo "new_packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 45 python3 -m anyattn bench kernels --mode host --host-rounds 5 --backends auto,sdpa,cudnn --no-progress \
  --out "$OUT/host" > "$OUT/host.log" 2>&1
echo "host rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^target|^new |^host|\+|us" "$OUT/new_packing.log" "$OUT/host.log" | cut -c1-160 | tail -40
