#!/usr/bin/env bash
# Installs what is needed (Debian packages), builds moedit and runs `moedit demo` on the bundled demo model.
# Usage: bash tools/demo.sh            (BUILD_DIR=build by default; JOBS=2)
set -euo pipefail
source "$(dirname "$0")/configure.sh"
cmake --build "$BUILD_DIR" -j "$JOBS" --target moedit
"$BUILD_DIR/moedit" demo "$@"
