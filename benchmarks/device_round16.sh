#!/usr/bin/env bash
# Round 16, the first call of a session (<= 9.8 min), adapted to the card that came:
#  on an H200: benchmarks/device_round14_all.sh (issue 15's one-process tables, then issue 17's decode
#   table in the time left; DEADLINE=570);
#   ROUND5_ONLY=1 (when little device time is left): device_round5.sh alone (~330 s), no tests;
#   TINY=1 (~200 s, for a last call on little device time): on an H200 issue 15's new-packing
#   and host tables; on an H100 the CUDA tests of the sdpa change and the paged-auto probe;
#  on an H100 (round 14 measured issue 15's tables there already):
#   (1) the CUDA tests of the sdpa fresh-mask change, the churn tests and flash_torch's strided
#       head dim (tests/test_cuda_core.py, test_cuda_churn.py, test_cuda_flash.py);
#   (2) the paged-auto decode probe: 32k context, B=64, paged cache, backends in both orders
#       (auto,flex then flex,auto), each in its own process with TORCH_LOGS=recompiles -> $OUT/paged_*;
#   (3) the ANKH large family stage (HF / port / compiled rows) in the time left -> $OUT/fam.
#   OUT=/path bash benchmarks/device_round16.sh      # from the repository root
. benchmarks/device_common.sh
if [ "${TINY:-0}" = 1 ]; then
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    timeout -s TERM -k 5 130 python3 -m anyattn bench kernels --mode new-packing --steps 50 --budget-s 90 --out "$OUT/new_packing" > "$OUT/new_packing.log" 2>&1
    echo "new_packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
    timeout -s TERM -k 5 60 python3 -m anyattn bench kernels --mode host --host-rounds 5 --backends auto,sdpa,cudnn --out "$OUT/host" > "$OUT/host.log" 2>&1
    echo "host rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
    tail -25 "$OUT/new_packing.log" "$OUT/host.log"
  else
    cuda_tests "${TEST_LIMIT:-100}" tests/test_cuda_core.py tests/test_cuda_churn.py tests/test_cuda_flash.py::test_flash_torch_takes_a_head_dim_with_a_stride_other_than_one \
      tests/test_cuda_serving.py::test_cuda_bench_serving_rows_count_compiles_and_allocator_retries
    TORCH_LOGS=recompiles timeout -s TERM -k 5 90 python3 -m anyattn bench serving --preset h100 --contexts 32768 --batches 64 \
      --impls anyattn/paged --backends auto,flex --steps 8 --out "$OUT/paged_auto_flex" > "$OUT/paged_auto_flex.log" 2>&1
    echo "paged rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
    grep -E "^decode" "$OUT/paged_auto_flex.log" | cut -c1-200
  fi
  exit 0
fi
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && [ "${ROUND5_ONLY:-0}" = 1 ]; then
  OUT=$OUT/r5 bash benchmarks/device_round5.sh > "$OUT/round5.log" 2>&1; echo "round5 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  tail -30 "$OUT/r5/summary.txt"
  exit 0
elif nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  DEADLINE=${DEADLINE:-570} bash benchmarks/device_round14_all.sh
  exit $?
fi
cuda_tests "${TEST_LIMIT:-150}" tests/test_cuda_core.py tests/test_cuda_churn.py tests/test_cuda_flash.py \
  tests/test_cuda_serving.py::test_cuda_bench_serving_rows_count_compiles_and_allocator_retries
for order in auto,flex flex,auto; do
  TORCH_LOGS=recompiles timeout -s TERM -k 5 100 python3 -m anyattn bench serving --preset h100 --contexts 32768 --batches 64 \
    --impls anyattn/paged --backends "$order" --steps 8 --out "$OUT/paged_${order/,/_}" > "$OUT/paged_${order/,/_}.log" 2>&1
  echo "paged $order rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
done
T=$(( ${DEADLINE:-570} - $(el) ))
[ "$T" -gt 150 ] && STAGES="ankh_large" TOTAL=$(( T - 10 )) OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$OUT/fam.log" 2>&1
echo "families rc=$? at $(el)s; total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^decode" "$OUT"/paged_*.log | cut -c1-170
tail -15 "$OUT/fam.log" 2>/dev/null
