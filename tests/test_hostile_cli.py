"""The `omi` client (`python -m omi_dsf …`) against careless input and hostile servers (issue 16): every
error is one line on stderr with exit code 2 and no traceback; plain http:// is refused where patient
identifiers would go; UIDs are checked before anything is sent; text from servers is printed with
control characters and terminal escapes made visible. Each case runs the command in a process of
its own (forked, helpers_cli.run_cli); the last test also starts the real `python -m omi_dsf` once."""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import BaseHTTPRequestHandler

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import ROOT, free_port
from helpers_cli import run_cli
from helpers_http import serve
from helpers_pki import issue, make_ca, write_ca, write_pem

ESC = "\x1b[2J\x1b]0;owned\x07"


def omi(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout)


def python_m_omi(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omi_dsf", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, *expected: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "\x1b" not in r.stderr and "\x9b" not in r.stderr
    for text in expected:
        assert text in r.stderr, r.stderr
    return r.stderr


def answering(status: int, body: bytes, ctype: str):
    """A stand-in server that answers every request with `body`."""
    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *a):
            pass
    return serve(Handler)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-pki")
    ca_key, ca_cert = make_ca("cli test CA")
    cert, key = write_pem(folder, "dic-client", *issue(ca_key, ca_cert, "dic client", ExtendedKeyUsageOID.CLIENT_AUTH))
    return {"ca": write_ca(folder / "ca.pem", ca_cert), "cert": cert, "key": key}


def site_file(tmp_path, pki, **extra) -> str:
    site = {"site": "dic.omi.test", "fhir_url": "https://127.0.0.1:1/fhir", "ca_file": pki["ca"],
            "client_cert": pki["cert"], "client_key": pki["key"], **extra}
    path = tmp_path / "site.yaml"
    path.write_text(json.dumps(site))
    return str(path)


# -- what the user types -------------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("http://[::1", "is not a valid URL"),
    ("ftp://registry.example.org", "unsupported URL scheme 'ftp'"),
    ("file:///etc/passwd", "unsupported URL scheme 'file'"),
    ("https://", "has no valid host"),
])
def test_bad_registry_urls(url, expected):
    one_line_error(omi("services", "--registry", url), expected)


def test_a_ca_file_that_is_not_pem(tmp_path):
    bogus = tmp_path / "ca.txt"
    bogus.write_text("this is not a certificate\n")
    one_line_error(omi("services", "--registry", f"https://127.0.0.1:{free_port()}", "--registry-ca", str(bogus)),
                   f"registry CA file {bogus} holds no PEM certificate")


@pytest.mark.parametrize("args, expected", [
    (["--watch", "--interval", "-1"], "argument --interval: must be a number of seconds above 0"),
    (["--watch", "--interval", "nan"], "argument --interval: must be a number of seconds above 0"),
    (["--watch", "--timeout", "0"], "argument --timeout"),
    (["--limit", "0"], "argument --limit: must be a whole number from 1 to 1000"),
])
def test_numbers_out_of_range(tmp_path, pki, args, expected):
    one_line_error(omi("status", "--site", site_file(tmp_path, pki), *args), expected)


@pytest.mark.parametrize("uid", ["not-a-uid", "1.2.03", "1.2.3.", "1.2." + "3" * 70, "1.2.3\n", "١.٢"])
def test_study_uid_checked_before_it_is_sent(tmp_path, pki, uid):
    # the DSF at fhir_url would refuse the connection: the UID check comes first
    one_line_error(omi("submit", "--study", uid, "--patient", "P-1", "--service", "lung-seg", "--provider",
                       "ai.omi.test", "--site", site_file(tmp_path, pki)), "--study", "is not a valid DICOM UID")


def test_plain_http_refused_where_patient_identifiers_go(tmp_path, pki):
    with answering(200, b"{}", "application/fhir+json") as url:
        site = site_file(tmp_path, pki, fhir_url=f"{url}/fhir")
        one_line_error(omi("submit", "--study", "1.2.3", "--patient", "P-1", "--service", "lung-seg", "--provider",
                           "ai.omi.test", "--site", site), "fhir_url", "is plain http://", "insecure: true")
        one_line_error(omi("status", "--site", site), "is plain http://")
        https_site = site_file(tmp_path, pki, gateway_url=f"{url}/dicomweb")
        one_line_error(omi("results", "KEY", "--site", https_site), "gateway", "is plain http://")


# -- what servers answer -------------------------------------------------------------------------

@pytest.mark.parametrize("status, body, ctype, expected", [
    (200, b"<html><body>login</body></html>", "text/html", "the answer is not JSON (text/html)"),
    (200, b"[1, 2, 3]", "application/fhir+json", "the answer is a JSON list, not a FHIR resource"),
    (200, b'{"resourceType": "Bundle", "entry": [{"resource": 5}]}', "application/fhir+json",
     "the answer is not a searchset Bundle"),
    (502, b"<html>" + ESC.encode() + b"</html>", "text/html", "HTTP 502"),
])
def test_registry_answering_nonsense(status, body, ctype, expected):
    with answering(status, body, ctype) as url:
        err = one_line_error(omi("services", "--registry", url), expected)
    assert "\\x1b" in err or "\x1b" not in body.decode()


@pytest.mark.parametrize("body, ctype", [(b"<html>not FHIR</html>", "text/html"), (b"[]", "application/fhir+json"),
                                         (b'{"resourceType": "Bundle", "entry": "x"}', "application/fhir+json")])
def test_dsf_answering_nonsense(tmp_path, pki, body, ctype):
    with answering(200, body, ctype) as url:
        # plain http only because the site file says so (a test set-up)
        site = site_file(tmp_path, pki, fhir_url=f"{url}/fhir", insecure=True)
        one_line_error(omi("status", "--site", site), "status: ")
        one_line_error(omi("results", "KEY", "--site", site), "results: ")


def test_terminal_escapes_from_the_registry_are_shown_escaped():
    from omi_dsf.registry import definitions as d

    name = f"lung{ESC}\u202eevil"
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"search": {"mode": "match"}, "resource": {
        "resourceType": "HealthcareService", "id": f"svc{ESC}", "name": name,
        "providedBy": {"identifier": {"system": d.ORG_SID, "value": f"ai{ESC}"}},
        "extension": [{"url": d.EXT_HEALTH, "extension": [{"url": "status", "valueCode": "down"},
                                                           {"url": "detail", "valueString": f"gone {ESC}"}]}]}}]}
    with answering(200, json.dumps(bundle).encode(), "application/fhir+json") as url:
        r = omi("services", "--registry", url)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
        assert "svc\\x1b[2J\\x1b]0;owned\\x07" in r.stdout and "gone \\x1b[2J" in r.stdout
        r = omi("services", "--registry", url, "--json")   # JSON escapes them itself
        assert r.returncode == 0 and "\x1b" not in r.stdout and json.loads(r.stdout)[0]["id"] == f"svc{ESC}"
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                               "diagnostics": f"no {ESC}\nsecond line"}]}
    with answering(400, json.dumps(outcome).encode(), "application/fhir+json") as url:
        one_line_error(omi("services", "--registry", url), "HTTP 400", "\\x1b[2J", "\\nsecond line")


def test_unforeseen_errors_are_one_line_too(tmp_path):
    # a part that raises something nobody foresaw: one line, the traceback only with -v
    bad = tmp_path / "gateway.yaml"
    bad.write_bytes(b"\xff\xfe not text")
    r = python_m_omi("gateway", "--config", str(bad), "--check")
    one_line_error(r)
    r = omi("registry", "--config", str(bad))
    one_line_error(r, "not a text file")
