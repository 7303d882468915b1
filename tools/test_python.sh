#!/usr/bin/env bash
# The Python binding (python/): a fresh virtual environment, `pip install .` (scikit-build-core + nanobind build the
# same CMake project, MOEDIT_PYTHON=ON), then pytest on python/tests against the `moedit` CLI built alongside.
# Usage: bash tools/test_python.sh [pytest args]
#   VENV=/tmp/moedit-venv        the virtual environment (recreated every run)
#   PY_BUILD_DIR=build-py        CMake build folder of the wheel, kept between runs so a rebuild is incremental
#   CMAKE_BUILD_PARALLEL_LEVEL=2 compile jobs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-/tmp/moedit-venv}
PY_BUILD_DIR=$(realpath -m "${PY_BUILD_DIR:-build-py}")
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

python3 -m venv --clear "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# Build requirements installed up front and no build isolation: the build folder then sees the same Python and
# nanobind paths every run, so CMake reuses it.
"$PY" -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.0" numpy pytest nbclient nbformat ipykernel
"$PY" -m pip install -q --no-build-isolation --config-settings=build-dir="$PY_BUILD_DIR" .
export MOEDIT_CLI="$PY_BUILD_DIR/moedit"  # the CLI from the same build, what the tests compare with
# From outside the source tree, so `import moedit` is the installed package, not python/moedit.
cd /tmp && "$PY" -m pytest -q -p no:cacheprovider "$OLDPWD/python/tests" "$@"
