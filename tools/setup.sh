#!/usr/bin/env bash
# Install everything the project needs on a fresh machine; cheap when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t pkgs < <(grep -v '^\s*#' tools/apt-packages.txt | awk 'NF{print $1}')
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's service packages try to start their daemons on install; the tests start their own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The project's own virtual environment (.venv, or $OMI_VENV): nothing is installed into the system
# Python, so other software on a DIC's server keeps its packages. tools/test.sh and tools/run.sh use it.
venv=${OMI_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'

# The model servers AI providers run, each in its own environment next to the project's (they pin
# fastapi/starlette versions of their own): `ai-service --server kserve|mlserver` runs the lung model
# on them with the project on its PYTHONPATH (omi_dsf/inference/servers.py).
for server in "kserve==0.21.0" "mlserver==1.7.1"; do
  name=${server%%==*}
  [ -x "$venv-$name/bin/python" ] || python3 -m venv "$venv-$name"
  "$venv-$name/bin/python" -m pip install -q --disable-pip-version-check "$server" numpy scipy
done

if [ -f plugin/pom.xml ]; then
  # Resolve the Maven build's artifacts once; ~/.m2 caches them between runs.
  mvn -q -B -f plugin/pom.xml dependency:go-offline >/dev/null || mvn -B -f plugin/pom.xml dependency:resolve
fi

# The DIC's FHIR store (HAPI FHIR JPA server, fhir-store/): built once, rebuilt when its sources change.
"$venv/bin/python" -m omi_dsf fhir-store build
