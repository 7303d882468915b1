# Sourced by tools/demo.sh and tools/test.sh: installs what is needed (Debian packages) and configures a Release
# build in $BUILD_DIR (default build) from the repository root, which it makes the current folder. JOBS=2 by default.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-2}
bash tools/setup.sh
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
