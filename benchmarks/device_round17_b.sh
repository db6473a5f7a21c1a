#!/usr/bin/env bash
# Round 17, second call (<= 7 min, one H100 or H200):
#  (1) the CUDA tests of what changed since round 16's tests ran: test_cuda_serving.py (flash_torch
#      reads pages only when the page size is a multiple of 256), test_cuda_core.py, test_cuda_churn.py,
#      test_cuda_flash.py (<= 220 s) -> $OUT/tests.log;
#  (2) why flex's new-padding fwd+bwd row moved from 2.56 ms (round 16) to 1.89 ms (round 17, call 1)
#      while flash_torch stayed at 2.47: `bench kernels --mode new-packing --cases padding
#      --forms lengths` at four B x S shapes, rows in both orders (flex first / flash_torch first),
#      one process each -> $OUT/pad_*.log;
#  (3) with `carry: [".fa4"]`: the profiler test of flex's FLASH lowering, fixed after call 1
#      (FunctionEventAvg has .key, not .name) -> $OUT/fa4_test.log.
#   OUT=/path bash benchmarks/device_round17_b.sh      # from the repository root
. benchmarks/device_common.sh
cuda_tests 220 tests/test_cuda_serving.py tests/test_cuda_core.py tests/test_cuda_churn.py tests/test_cuda_flash.py
for shape in 8x2048 4x4096 16x1024 2x8192; do
  for order in flex,flash_torch,auto flash_torch,flex,auto; do
    timeout -s TERM -k 5 60 python3 -m anyattn bench kernels --mode new-packing --cases padding --forms lengths --modes fwd+bwd \
      --backends "$order" --pad-shape "$shape" --steps 60 --no-progress > "$OUT/pad_${shape}_${order%%,*}.log" 2>&1
    echo "pad $shape $order rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
    grep -E "^  (flex|flash_torch|auto|raw)" "$OUT/pad_${shape}_${order%%,*}.log" | grep -v "ms/step" | tee -a "$OUT/summary.txt"
  done
done
if [ -f .fa4/fa4site.tar.xz ]; then
  mkdir -p /tmp/site && xz -d < .fa4/fa4site.tar.xz | tar x -C /tmp/site
  PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:src timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider \
    "tests/test_cuda_fa4.py::test_flex_flash_lowering_runs_no_triton_attention_kernel" > "$OUT/fa4_test.log" 2>&1
  echo "fa4 test rc=$? at $(el)s: $(tail -1 "$OUT/fa4_test.log")" | tee -a "$OUT/summary.txt"
fi
echo "total $(el)s" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
