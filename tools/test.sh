#!/usr/bin/env bash
# Set up, then run every test: unit tests and integration tests (real servers on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PATH="$(realpath -m "${OMI_VENV:-.venv}")/bin:$PATH"   # the project environment that setup.sh made
# the DSF test bed deploys the plugin jar from dist/, so build it before the tests start
python3 -m omi_dsf build
python3 -m pytest "$@"
