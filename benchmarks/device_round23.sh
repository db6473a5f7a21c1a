#!/usr/bin/env bash
# Round 23, one call (<= ~9.5 min), with `carry: [".fa4"]` (flash-attn-4 for the FLASH rows and
# test_cuda_fa4; benchmarks/fa4_pack.sh builds it).
#   on an H200: issue 15's one-process tables first (benchmarks/device_round5.sh without its static
#      stage: new packing / new padding every step, host overhead, ESM2-650M plain / compiled /
#      first pass; <= R5_S s), then the tests below in what is left;
#   on any card: flex's FLASH / Triton lowering tests, softcap, tanh and kernel-guarantee tests
#      (test_cuda_fa4, test_cuda_core; -k TESTS_K; <= TESTS_S s), then on a non-H200 card `anyattn
#      bench kernels --preset h200` on causal, softcap and ALiBi (bf16) with cuDNN, flex (its default
#      lowering choice), flex with Triton forced and raw flex, in what is left of TOTAL s.
# Everything comes back as $OUT/all.tar.gz plus $OUT/summary.txt.
#   OUT=/path bash benchmarks/device_round23.sh      # from the repository root
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r23.XXXXXX)
. benchmarks/device_common.sh
TOTAL=${TOTAL:-560}
K=${TESTS_K:-flex or softcap or guarantees or tanh}
use_fa4_site
H200=0
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && H200=1
if [ "$H200" = 1 ]; then
  SKIP_KERNELS=1 OUT=$OUT/r5 timeout -s TERM -k 5 "${R5_S:-330}" bash benchmarks/device_round5.sh > "$OUT/round5.log" 2>&1
  echo "round5 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  cp /tmp/round5.*/logs.txt "$OUT/round5_work_logs.txt" 2>/dev/null
  left=$(( TOTAL - $(el) )); [ "$left" -lt 30 ] && left=30
  cuda_tests "$left" tests/test_cuda_fa4.py tests/test_cuda_core.py -k "$K"
else
  cuda_tests "${TESTS_S:-240}" tests/test_cuda_fa4.py tests/test_cuda_core.py -k "$K"
  left=$(( TOTAL - $(el) )); [ "$left" -lt 40 ] && left=40
  timeout -s TERM -k 5 "$left" python3 -m anyattn bench kernels --preset h200 --variants causal,softcap,alibi \
    --dtypes bf16 --backends cudnn,flex,flex:triton,raw:flex --budget-s $(( left - 25 )) --no-progress --out "$OUT/kernels" \
    > "$OUT/kernels.log" 2>&1
  echo "kernels rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
fi
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
cp "$OUT/kernels/kernels.md" "$FINAL/kernels.md" 2>/dev/null
tail -30 "$OUT/kernels.log" 2>/dev/null
tail -30 "$OUT/r5/summary.txt" 2>/dev/null
