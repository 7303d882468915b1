#!/usr/bin/env bash
# Installs what is needed (Debian packages), builds moedit and runs `moedit demo` on the bundled demo model.
# Usage: bash tools/demo.sh            (BUILD_DIR=build by default; JOBS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-2}
bash tools/setup.sh
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j "$JOBS" --target moedit
"$BUILD_DIR/moedit" demo "$@"
