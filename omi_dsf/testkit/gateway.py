"""The gateway as its own process (`python -m omi_dsf gateway --config FILE`), as a site runs it:
for the demo, tests and benchmarks. The configuration is written as the YAML an operator would
write; start() returns once /health answers, stop() asks, then insists."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import httpx
import yaml

from omi_dsf.peer import Peer
from omi_dsf.testkit import procs


class GatewayProcess(procs.ChildProcess):
    def __init__(self, config: Mapping[str, Any], folder: Path, name: str = "gateway",
                 ca_file: str | os.PathLike | None = None, timeout: float = 30.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_file = self.folder / f"{name}.yaml"
        self.config_file.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        self.log = self.folder / f"{name}.log"
        listen = config["listen"]
        self.url = f"{'https' if config.get('tls') else 'http'}://{listen['host']}:{listen['port']}"
        self.ca_file, self.timeout = ca_file, timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "GatewayProcess":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "omi_dsf", "gateway", "--config", str(self.config_file)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        peer = Peer(self.url, ca_file=str(self.ca_file) if self.ca_file else None, timeout=2, where="gateway")
        with peer.client() as http:
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"gateway did not start on {self.url}; see {self.log}")
                time.sleep(0.1)
