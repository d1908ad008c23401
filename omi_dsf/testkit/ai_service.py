"""The reference AI service as a child process (`python -m omi_dsf ai-service`), for the demo,
tests and benchmarks: started on a loopback port, returned once its model is ready, stopped."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

from omi_dsf.inference.client import OipClient, ServiceUnavailable
from omi_dsf.testkit import procs

MODEL = "lung-seg"


class AiServiceProcess(procs.ChildProcess):
    def __init__(self, port: int | None = None, log: Path | None = None, args: tuple[str, ...] = (),
                 timeout: float = 60.0, tls: ssl.SSLContext | None = None, token: str | None = None):
        """Without `--config` in `args`: plain HTTP on loopback, no authentication (`--anonymous`).
        With a configuration that serves TLS, `tls` is the client context to reach it (and `token` a
        bearer token if its readiness needs one)."""
        self.port = port or procs.free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log, self.timeout, self.tls, self.token = log, timeout, tls, token
        self.args = tuple(args) if "--config" in args else ("--anonymous", *args)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AiServiceProcess":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "omi_dsf", "ai-service", "--host", "127.0.0.1",
                                          "--port", str(self.port), *self.args],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log:
                out.close()
        deadline = time.monotonic() + self.timeout
        with OipClient(self.url, timeout=10, verify=self.tls, token=self.token) as ai:
            while True:   # up at all (or dead), then the model ready
                try:
                    if ai.server_live():
                        break
                except ServiceUnavailable:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"reference AI service did not start on {self.url}"
                                       + (f"; see {self.log}" if self.log else ""))
                time.sleep(0.1)
            ai.wait_until_ready(MODEL, timeout=max(1.0, deadline - time.monotonic()))
        return self
