"""The registry as it runs: `python -m omi_dsf registry` over mutual TLS on 127.0.0.1, the reference
AI service (`python -m omi_dsf ai-service`) for real Open Inference Protocol health checks, the `omi
services` command, and the status page in headless Debian chromium (screenshot kept in
test-artifacts/registry-status.png)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import ROOT, free_port
from helpers_pki import CLIENT, LOOPBACK, SERVER, issue, make_ca, write_ca, write_pem
from omi_dsf.registry.auth import thumbprint
from omi_dsf.registry.entries import service_bundle

pytestmark = pytest.mark.integration
AI = "ai.omi.test"
KEY_PASSWORD = "registry-test-key-password"
LUNG = ("http://snomed.info/sct", "39607008")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omi_dsf", *args], cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, verify=True, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, verify=verify, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not answering after {timeout} s")


@pytest.fixture(scope="module")
def env(tmp_path_factory, fhir_store):
    folder = tmp_path_factory.mktemp("registry-it")
    ca_key, ca_cert = make_ca("registry test CA")
    ca = write_ca(folder / "ca.pem", ca_cert)
    server = write_pem(folder, "registry", *issue(ca_key, ca_cert, "localhost", SERVER, LOOPBACK), password=KEY_PASSWORD)
    provider = write_pem(folder, "provider", *issue(ca_key, ca_cert, "ai provider client", CLIENT), password=KEY_PASSWORD)
    stranger = write_pem(folder, "stranger", *issue(ca_key, ca_cert, "unmapped client", CLIENT), password=KEY_PASSWORD)
    (folder / "key-password").write_text(KEY_PASSWORD)
    der = x509.load_pem_x509_certificate(Path(provider[0]).read_bytes()).public_bytes(serialization.Encoding.DER)

    ai_port, reg_port = free_port(), free_port()
    ai_log, reg_log = folder / "ai-service.log", folder / "registry.log"
    ai = _start(["ai-service", "--anonymous", "--host", "127.0.0.1", "--port", str(ai_port)], ai_log)
    from omi_dsf.peer import Peer
    from omi_dsf.registry.store import Store
    Store(Peer(url=fhir_store.state().base_url)).clear()   # no entries of earlier tests in the session's store
    cfg = {"host": "127.0.0.1", "port": reg_port, "fhir_store": {"url": fhir_store.state().base_url},
           "tls": {"certfile": server[0], "keyfile": server[1],
                   "keyfile_password_file": "key-password", "client_ca": ca},
           "auth": {"organizations": {thumbprint(der): AI}, "cert_attribute": None},
           "health": {"interval": 1, "timeout": 2, "degraded_latency_ms": 3000, "heartbeat_timeout": 600},
           "limits": {"header_timeout": 2, "body_timeout": 2}}   # short, for tests/test_hostile_registry.py
    (folder / "registry.yaml").write_text(yaml.safe_dump(cfg))
    reg = _start(["registry", "--config", str(folder / "registry.yaml")], reg_log)
    url = f"https://127.0.0.1:{reg_port}"
    try:
        _wait_http(f"http://127.0.0.1:{ai_port}/v2/health/ready", ai, ai_log)
        _wait_http(f"{url}/health", reg, reg_log, verify=ssl.create_default_context(cafile=ca))
        yield {"folder": folder, "url": url, "ca": ca, "ai_port": ai_port, "ai": ai,
               "provider": (*provider, KEY_PASSWORD), "stranger": (*stranger, KEY_PASSWORD),
               "server_cert": Path(server[0]), "reg_log": reg_log, "reg": reg, "port": reg_port}
    finally:
        _stop(reg)
        _stop(ai)


def _client(env, who: str | None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=env["ca"])
    if who:
        ctx.load_cert_chain(*env[who])
    return httpx.Client(base_url=env["url"], verify=ctx, timeout=10)


def _omi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omi_dsf", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _services(env, *filters: str) -> list[dict]:
    r = _omi("services", "--registry", env["url"], "--registry-ca", env["ca"], "--json", *filters)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _wait_status(env, wanted: dict[str, str], timeout: float = 30) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = {s["id"]: s for s in _services(env)}
        if all(got.get(k, {}).get("status") == v for k, v in wanted.items()):
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"status not reached in {timeout} s: want {wanted}, have "
                        f"{ {k: (s['status'], s['detail']) for k, s in got.items()} }")
        time.sleep(0.5)


def test_registration_over_mtls_and_health_states(env):
    ai_url = f"http://127.0.0.1:{env['ai_port']}"
    bundles = [
        service_bundle(AI, "lung-seg", name="Lung segmentation", model="lung-seg", model_version="0.1.0",
                       oip_url=ai_url, modality=["CT"], body_site=[LUNG]),
        service_bundle(AI, "ghost-model", name="Model not loaded", model="no-such-model", model_version="1",
                       oip_url=ai_url, modality=["MR"], body_site=[LUNG]),
        service_bundle(AI, "offline", name="Offline service", model="lung-seg", model_version="0.1.0",
                       oip_url=f"http://127.0.0.1:{free_port()}", modality=["CT"], body_site=[LUNG]),
    ]
    with _client(env, "provider") as c:
        for b in bundles:
            r = c.post("/fhir", json=b, headers={"Content-Type": "application/fhir+json"})
            assert r.status_code == 200, r.text
        r = c.post("/fhir/HealthcareService/lung-seg/$heartbeat")
        assert r.status_code == 200, r.text
    # an unmapped certificate and no certificate at all may not write
    with _client(env, "stranger") as c:
        r = c.post("/fhir", json=bundles[0], headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 403 and "not mapped to an organization" in r.text
    with _client(env, None) as c:
        r = c.post("/fhir", json=bundles[0], headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 401
        assert c.get("/fhir/HealthcareService?unknown=1").status_code == 400
    got = _wait_status(env, {"lung-seg": "up", "ghost-model": "degraded", "offline": "down"})
    up = got["lung-seg"]
    assert up["latency_ms"] is not None and 0 < up["latency_ms"] < 3000 and up["checked"] and up["heartbeat"]
    assert up["oip_url"] == ai_url and up["model"] == "lung-seg" and up["provider"] == AI
    assert "model not ready" in got["ghost-model"]["detail"] and "unreachable" in got["offline"]["detail"]
    assert [s["id"] for s in _services(env, "--modality", "CT", "--status", "up")] == ["lung-seg"]
    text = _omi("services", "--registry", env["url"], "--registry-ca", env["ca"], "--modality", "MR")
    assert text.returncode == 0 and "ghost-model" in text.stdout and "degraded" in text.stdout


def test_cli_errors_are_one_line(env):
    # TLS verification stays on: without the test CA the registry's certificate is refused
    r = _omi("services", "--registry", env["url"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
    r = _omi("services", "--registry", env["url"], "--registry-ca", env["ca"], "--status", "sideways")
    assert r.returncode == 0 and r.stdout.strip() == "no AI services match"
    r = _omi("services", "--registry", f"https://127.0.0.1:{free_port()}", "--registry-ca", env["ca"])
    assert r.returncode == 2 and r.stderr.startswith("error: registry https://127.0.0.1:") and r.stderr.count("\n") == 1
    r = _omi("services")
    assert r.returncode == 2 and "no registry" in r.stderr


def test_status_page_in_headless_chromium(env, artifacts_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian chromium is not installed (tools/apt-packages.txt)")
    _wait_status(env, {"lung-seg": "up", "offline": "down"})
    time.sleep(2.5)   # a few more check rounds for the history column
    # chromium trusts exactly this server key (SPKI pin) instead of skipping certificate checks
    cert = x509.load_pem_x509_certificate(env["server_cert"].read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    shot = artifacts_dir / "registry-status.png"
    shot.unlink(missing_ok=True)
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
              f"--ignore-certificate-errors-spki-list={pin}", "--window-size=1400,700"]
    dom = subprocess.run([*common, "--dump-dom", f"{env['url']}/"], capture_output=True, text=True, timeout=90)
    assert 'data-service="lung-seg"' in dom.stdout, dom.stderr[-2000:]
    row = dom.stdout.split('data-service="lung-seg"')[1].split("</tr>")[0]
    assert '<span class="st up">up</span>' in row and " ms</td>" in row
    offline = dom.stdout.split('data-service="offline"')[1].split("</tr>")[0]
    assert '<span class="st down">down</span>' in offline and offline.count('class="down"') >= 2
    r = subprocess.run([*common, f"--screenshot={shot}", f"{env['url']}/"], capture_output=True, text=True,
                       timeout=90, cwd=tmp_path)
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    from PIL import Image
    with Image.open(shot) as img:
        assert img.size == (1400, 700)
        colours = img.convert("RGB").getcolors(1 << 20)
    # the page drew the green "up" and red "down" badges (not just a blank or an error page)
    assert any(rgb == (46, 125, 50) for _, rgb in colours) and any(rgb == (198, 40, 40) for _, rgb in colours)


def test_failing_service_is_marked_not_deleted(env):
    _wait_status(env, {"lung-seg": "up"})
    _stop(env["ai"])
    got = _wait_status(env, {"lung-seg": "down"})
    assert "unreachable" in got["lung-seg"]["detail"]
    with _client(env, None) as c:
        hs = c.get("/fhir/HealthcareService/lung-seg")
    assert hs.status_code == 200 and hs.json()["active"] is True
