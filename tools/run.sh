#!/usr/bin/env bash
# Set up, then run the main job: build the OMI DSF process plugin into dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
python3 -m omi_dsf build "$@"
