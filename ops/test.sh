#!/usr/bin/env bash
# Installs, builds (ops/setup.sh) and runs the whole test suite. Exits non-zero on any
# failure. Pass ctest arguments through, e.g. ops/test.sh -R Checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
BUILD_DIR="${LLAMAD_BUILD_DIR:-build}"
cd "$BUILD_DIR"
ctest --output-on-failure -j "${LLAMAD_TEST_JOBS:-2}" "$@"
