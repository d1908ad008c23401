"""The gateway as a process: `python -m omi_dsf gateway --config FILE`, over TLS with client
certificates (mutual TLS), and its configuration errors on the command line."""

from __future__ import annotations

import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers_pki import issue, make_ca, write_ca, write_pem

from conftest import free_port
from helpers_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pki(tmp_path) -> dict:
    ca_key, ca = make_ca("OMI test CA")
    out = {"ca": Path(write_ca(tmp_path / "ca.pem", ca))}
    out["server"] = write_pem(tmp_path, "server", *issue(ca_key, ca, "server", ExtendedKeyUsageOID.SERVER_AUTH,
                                                         [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    out["client"] = write_pem(tmp_path, "client", *issue(ca_key, ca, "client", ExtendedKeyUsageOID.CLIENT_AUTH))
    stranger_key, stranger_ca = make_ca("someone else")
    out["intruder"] = write_pem(tmp_path, "intruder",
                                *issue(stranger_key, stranger_ca, "intruder", ExtendedKeyUsageOID.CLIENT_AUTH))
    return out


def _tls(ca: Path | None, cert: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def _wait_up(url: str, proc: subprocess.Popen, **kw) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
        try:
            httpx.get(url + "/health", timeout=1, **kw)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, "gateway did not come up"
            time.sleep(0.2)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_gateway_command_serves_mutual_tls(tmp_path, pki):
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"tls: {{certfile: server.pem, keyfile: server.key, client_ca: ca.pem, require_client_cert: true}}\n"
        f"backends:\n  OUTBOX: {{type: store, path: outbox}}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "omi_dsf", "gateway", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"https://127.0.0.1:{port}"
    try:
        _wait_up(url, proc, verify=_tls(pki["ca"], pki["client"]))
        ok = httpx.get(f"{url}/studies", verify=_tls(pki["ca"], pki["client"]), timeout=10)
        assert ok.status_code == 200 and ok.json() == []
        for cert in (None, pki["intruder"]):  # no certificate, or one from another CA: no handshake
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{url}/studies", verify=_tls(pki["ca"], cert), timeout=10)
        with pytest.raises(httpx.TransportError):  # and the client checks the gateway too
            httpx.get(f"{url}/studies", verify=_tls(None, pki["client"]), timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_gateway_command_reports_config_errors(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("auth: {anonymous: true}\nbackends:\n  PACS: {type: dimse, host: pacs.local}\n")
    r = run_cli("gateway", "--config", str(config))
    assert r.returncode == 2
    assert "backends.PACS.port" in r.stderr
    config.write_text("auth: {anonymous: true}\nbackends:\n  PACS: {type: dimse, host: pacs.local, port: 104}\n")
    r = run_cli("gateway", "--config", str(config), "--endpoints")
    assert r.returncode == 0 and '"dicom-qido-rs"' in r.stdout
