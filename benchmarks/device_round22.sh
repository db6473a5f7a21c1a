#!/usr/bin/env bash
# Round 22, one call (<= ~9.5 min), with `carry: [".fa4"]` where the FLASH rows are wanted.
#   on an H200: issue 15's one-process tables (benchmarks/device_round5.sh without its static stage:
#      new packing / new padding every step, host overhead, ESM2-650M plain / compiled / first pass;
#      <= R5_S s), then the CUDA tests of round 21 c (flex_tanh's registration inside a caller's
#      compiled graph, flex's kernel guarantees) in what is left of ~570 s;
#   on any other card: round 21 c's tests (<= TESTS_S s), then flex_config_probe.py on softcap,
#      documents and window at 1 x 16 x 16384 x 128 (Triton defaults / guarantees / TMA / FLASH
#      next to cuDNN causal; <= PROBE_S s).
# Everything is written under a work folder and comes back as $OUT/all.tar.gz plus $OUT/summary.txt.
#   OUT=/path bash benchmarks/device_round22.sh      # from the repository root
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r22.XXXXXX)
. benchmarks/device_common.sh
TESTS=(tests/test_cuda_train.py tests/test_cuda_core.py tests/test_cuda_hf.py -k "test_cuda_train or flex or softcap or tanh or gemma")
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  SKIP_KERNELS=1 OUT=$OUT/r5 timeout -s TERM -k 5 "${R5_S:-380}" bash benchmarks/device_round5.sh > "$OUT/round5.log" 2>&1
  echo "round5 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  cp /tmp/round5.*/logs.txt "$OUT/round5_work_logs.txt" 2>/dev/null
  left=$(( 570 - $(el) )); [ "$left" -lt 30 ] && left=30
  cuda_tests "$left" "${TESTS[@]}"
else
  cuda_tests "${TESTS_S:-280}" "${TESTS[@]}"
  PP=src
  if [ -f .fa4/fa4site.tar.xz ]; then
    mkdir -p /tmp/site && xz -d < .fa4/fa4site.tar.xz | tar x -C /tmp/site
    PP=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:src
  fi
  left=$(( 560 - $(el) )); [ "$left" -lt 30 ] && left=30
  PYTHONPATH=$PP timeout -s TERM -k 5 "$left" python3 benchmarks/flex_config_probe.py --variants softcap,documents,window \
    --deadline $(( left - 20 )) --out "$OUT" > "$OUT/probe.log" 2>&1
  echo "probe rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
fi
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
tail -40 "$OUT/probe.log" 2>/dev/null
tail -30 "$OUT/r5/summary.txt" 2>/dev/null
