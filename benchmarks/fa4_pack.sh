#!/usr/bin/env bash
# Builds .fa4/fa4site.tar.xz (about 57 MiB), the FlashAttention-4 packages for the GPU machine
# (which has no package registry), read by benchmarks/device_round6_fa4.sh and
# device_round15_b.sh (`carry: [".fa4"]`). Run here, where pip reaches PyPI, from the
# repository root; about 4 minutes on 2 cores (xz -9e with a 256 MiB dictionary, which is what
# brings the 92 MB nvidia-cutlass-dsl-libs-cu13 wheel under a call's 64 MiB).
#   bash benchmarks/fa4_pack.sh
# The versions are those measured in benchmarks/results/round9 (flash-attn-4 is a pre-release).
# torch, einops, cuda-bindings and protobuf are not packed: the GPU machine has them.
set -euo pipefail
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$W/whl" \
  flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
python3 -m pip install -q --no-deps --no-compile --target "$W/site" --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --only-binary=:all: "$W"/whl/*.whl
mkdir -p .fa4
(cd "$W/site" && tar cf - .) | xz -9e --lzma2=dict=256MiB -T1 > .fa4/fa4site.tar.xz
ls -l .fa4/fa4site.tar.xz
