#!/usr/bin/env bash
# Installs what is needed (Debian packages), builds moedit and runs the whole test suite.
# Usage: bash tools/test.sh            (BUILD_DIR=build by default; JOBS=2)
set -euo pipefail
source "$(dirname "$0")/configure.sh"
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" -j "$JOBS" --output-on-failure --timeout 900
