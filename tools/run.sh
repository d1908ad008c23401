#!/usr/bin/env bash
# Set up, build the DSF process plugin, then run the demo: two DSF 1.9 sites on this machine, one
# inference end to end (legacy PACS → consent → send (pseudonymized as it goes) → infer → return), shut down.
# Pass --keep to leave the DSF test bed running. Needs a DSF 1.9 distribution (DSF_HOME, see
# docs/testbed.md); without one the build still runs and the demo says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PATH="$(realpath -m "${OMI_VENV:-.venv}")/bin:$PATH"   # the project environment that setup.sh made
python3 -m omi_dsf build
python3 -m omi_dsf demo "$@"
