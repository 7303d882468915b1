#!/usr/bin/env bash
# The CUDA backend's tests with no GPU: kernels/cuda/*.cu compiled by the host compiler against a host emulation of
# the CUDA runtime (cuda_runtime*.h here: one std::thread per CUDA thread, blocks one after another, barriers for
# __syncthreads, warp shuffles and ballots; device memory is host memory filled with 0xff, so uninitialised reads show
# as NaN). It checks the kernels' logic — indexing, tiling, grouping, reductions, the seam's semantics — against the
# CPU backend, not their speed, inter-block races, launch limits or device arithmetic (exp, fma are the host's).
#
#   tests/cuda/emu/run.sh [gtest args]     e.g. --gtest_filter='CudaBackend.*'   (all tests: ~2 minutes)
#   BUILD=/tmp/build-cuda   a -DMOEDIT_CUDA=ON build whose layer libraries are built (ninja moedit_cuda_tests)
#   EXTRA="-fsanitize=address -fno-omit-frame-pointer"   also checks every device access against its allocation
#   KSRC=dir                the .cu files to use (default kernels/cuda; a mutated copy checks that the tests notice)
#   EMU_TESTS="a.cpp b.cpp" the test files of tests/cuda/ to build (default: the op tests; whole models are too slow)
set -euo pipefail
emu=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$emu/../../.." && pwd)
B=${BUILD:-/tmp/build-cuda}
W=${EMU_DIR:-/tmp/moedit_cuda_emu}
mkdir -p "$W/src" "$W/obj"
for f in "${KSRC:-$root/kernels/cuda}"/*.cu; do python3 "$emu/transform.py" "$f" "$W/src/$(basename "$f" .cu).cpp"; done
# -march=native as the layer libraries of a default (MOEDIT_NATIVE) build: Eigen's alignment must agree across them.
flags=(${EXTRA:-} -march=native -std=c++20 -O1 -g -ffp-contract=off -pthread -fopenmp -Wno-unknown-pragmas -I"$emu" -I"$root"
       -isystem /usr/include/eigen3 -DMOEDIT_HAS_CUDA=1 "-DMOEDIT_SOURCE_DIR=\"$root\"" '-DMOEDIT_BIN="/bin/false"'
       -DEIGEN_DONT_PARALLELIZE -DPCRE2_CODE_UNIT_WIDTH=8)
objs=()
tests=()
for t in ${EMU_TESTS:-test_cuda_backend.cpp test_cuda_backward.cpp test_cuda_moe.cpp}; do tests+=("$root/tests/cuda/$t"); done
for f in "$W"/src/*.cpp "$root"/kernels/cuda/*.cpp "$root"/kernels/device.cpp "${tests[@]}"; do
  o=$W/obj/$(basename "$f" .cpp)-$(echo "$f ${EXTRA:-}" | md5sum | cut -c1-8).o
  objs+=("$o")
  g++ "${flags[@]}" -c "$f" -o "$o"
done
# The emulated objects come first: the archives' CUDA members (real runtime calls) are never pulled in.
libs=()
for l in eval editor tracing model datasets tokenizer io kernels; do libs+=("$B/libmoedit_$l.a"); done
g++ ${EXTRA:-} -pthread -fopenmp -o "$W/emu_tests" "${objs[@]}" "${libs[@]}" -lgtest -lgtest_main -lpcre2-8 \
  -lutf8proc -lbrotlidec
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} "$W/emu_tests" "$@"
