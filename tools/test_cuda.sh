#!/usr/bin/env bash
# The CUDA configuration: builds moedit and the CUDA backend's tests with -DMOEDIT_CUDA=ON in build-cuda/ and runs
# those tests (op by op and whole fixture models against the CPU backend). Without a GPU every test skips, saying
# so: on CI this checks that the CUDA code compiles and links. Without nvcc it says so and exits 0.
# Usage: bash tools/test_cuda.sh      (BUILD_DIR=build-cuda, JOBS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/cuda/bin
if ! command -v nvcc >/dev/null; then
  echo "test_cuda: no nvcc on this machine: the CUDA configuration is not built"
  exit 0
fi
BUILD_DIR=${BUILD_DIR:-build-cuda}
CMAKE_ARGS="-DMOEDIT_CUDA=ON -DMOEDIT_BUILD_BENCH=OFF ${CMAKE_ARGS:-}"
source tools/configure.sh
cmake --build "$BUILD_DIR" -j "$JOBS" --target moedit moedit_cuda_tests
"$BUILD_DIR/moedit_cuda_tests" --gtest_brief=1
