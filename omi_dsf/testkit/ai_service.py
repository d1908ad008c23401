"""The lung model's AI service as a child process (`python -m omi_dsf ai-service --server ...`: the
reference service, KServe's or MLServer's model server), for the demo, tests and benchmarks: started
on a loopback port, returned once its model is ready, stopped with the server it started.
`write_device` writes the model's Device entry as a provider registers it (for servers whose
model metadata has no parameters)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

from omi_dsf.inference import lungseg
from omi_dsf.inference.client import OipClient, ServiceUnavailable
from omi_dsf.registry.entries import service_bundle
from omi_dsf.testkit import procs

MODEL = "lung-seg"


class AiServiceProcess(procs.ChildProcess):
    def __init__(self, port: int | None = None, log: Path | None = None, args: tuple[str, ...] = (),
                 timeout: float = 60.0, tls: ssl.SSLContext | None = None, token: str | None = None,
                 server: str = "reference"):
        """Without `--config` in `args`: plain HTTP on loopback, no authentication (`--anonymous`).
        With a configuration that serves TLS, `tls` is the client context to reach it (and `token` a
        bearer token if its readiness needs one). `server`: reference, kserve or mlserver (KServe's
        server listens on all interfaces; it is reached on loopback)."""
        self.server = server
        self.port = port or procs.free_port()
        # KServe and MLServer turn HTTP tensors into Python lists (MLServer takes JSON only); over their
        # gRPC ports tensors travel as raw bytes
        self.grpc_port = procs.free_port() if server in ("kserve", "mlserver") and tls is None else None
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}" if self.grpc_port else None
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        # Prometheus metrics (the model time each server reports): MLServer's own port, KServe's HTTP port
        self.metrics_port = procs.free_port() if server == "mlserver" else None
        self.metrics_url = (f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port
                            else f"{self.url}/metrics" if server == "kserve" else None)
        self.log, self.timeout, self.tls, self.token = log, timeout, tls, token
        self.args = tuple(args) if "--config" in args else ("--anonymous", *args)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AiServiceProcess":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            host = () if self.server == "kserve" else ("--host", "127.0.0.1")
            if self.grpc_port:
                host += ("--grpc-port", str(self.grpc_port))
            if self.metrics_port:
                host += ("--metrics-port", str(self.metrics_port))
            self.proc = subprocess.Popen([sys.executable, "-m", "omi_dsf", "ai-service", "--server", self.server,
                                          *host, "--port", str(self.port), *self.args],
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
                    raise RuntimeError(f"AI service ({self.server}) did not start on {self.url}"
                                       + (f"; see {self.log}" if self.log else ""))
                time.sleep(0.1)
            ai.wait_until_ready(MODEL, timeout=max(1.0, deadline - time.monotonic()))
        return self

    def stop(self) -> None:
        """Stop the command and the model server it started (its process group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # what is left of the group, if anything
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def write_device(path: Path, url: str, max_slices: int = lungseg.DEFAULT_MAX_SLICES) -> Path:
    """The lung model's Device as a provider registers it (registry/entries.py), as a JSON file."""
    bundle = service_bundle("ai.example.org", "lung-seg", name="Lung segmentation", model=lungseg.NAME,
                            model_version=lungseg.VERSION, oip_url=url, modality=["CT"],
                            body_site=[("http://snomed.info/sct", "39607008")], min_slices=3,
                            max_slices=max_slices, labels={"1": "right lung", "2": "left lung"})
    device = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
    path.write_text(json.dumps(device, indent=1))
    return path
