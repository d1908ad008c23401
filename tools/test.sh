#!/usr/bin/env bash
# Set up, then run every test: unit tests and integration tests (real servers on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PATH="$(realpath -m "${OMI_VENV:-.venv}")/bin:$PATH"   # the project environment that setup.sh made
# the DSF test bed deploys the plugin jar from dist/, so build it before the tests start
python3 -m omi_dsf build
# pytest's temporary folders in a root of this run's own: pytest keeps only the last three runs'
# folders under one root and deletes older ones, so another test run on the machine would delete
# this run's servers' folders while they run
export PYTEST_DEBUG_TEMPROOT="${PYTEST_DEBUG_TEMPROOT:-$(mktemp -d /tmp/omi-tests.XXXXXX)}"
python3 -m pytest "$@"
