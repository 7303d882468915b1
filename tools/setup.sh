#!/usr/bin/env bash
# Installs the Debian packages moedit needs to build and test (idempotent; needs root or sudo).
# Python is NOT needed to build, test or run moedit; tools/requirements.txt is only for the fixture scripts.
set -euo pipefail
PKGS=(build-essential cmake ninja-build pkg-config libeigen3-dev nlohmann-json3-dev libcli11-dev
      libgtest-dev libgmock-dev libpcre2-dev libutf8proc-dev libbrotli-dev
      openmpi-bin libopenmpi-dev)  # Open MPI: `moedit eval/stats --mpi` (optional at build time; tests run mpirun)
# `bash tools/setup.sh --sanitize` adds clang with its sanitizer and libFuzzer runtimes (tools/test_sanitize.sh).
if [ "${1:-}" = "--sanitize" ]; then PKGS+=(clang libclang-rt-dev libomp-dev); fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
