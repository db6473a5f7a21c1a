#!/usr/bin/env bash
# Round 21 c, one call (<= ~5 min), not yet run: the CUDA
# tests after flex_tanh's registration fix (its first use may now come inside a caller's compiled
# graph: test_cuda_train's compiled Decoder with softcap on flex / auto failed in call 6 without
# it) and flex's kernel guarantees: test_cuda_train (all), test_cuda_core and test_cuda_hf on flex.
#   OUT=/path bash benchmarks/device_round21_c.sh      # from the repository root
. benchmarks/device_common.sh
cuda_tests "${TESTS_S:-280}" tests/test_cuda_train.py tests/test_cuda_core.py tests/test_cuda_hf.py \
  -k "test_cuda_train or flex or softcap or tanh or gemma"
