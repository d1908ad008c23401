"""The reference AI service against hostile input (issue 16): bounded fuzzing of the real server, the
limits (body size refused before it is read, JSON part, read timeouts, requests at once, query length),
malformed parameters as 4xx, and the ways in (mutual TLS, JWT, anonymous only when configured).
The limits, the fuzzing and mutual TLS run `python -m omi_dsf ai-service` (integration); the rest runs
the service's app in process."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from helpers_cli import run_cli
from helpers_hostile import json_values, mutated, odd_text, raw_request, rss_mb, signed_token, status_of
from helpers_pki import issue, make_ca, write_ca, write_pem
from omi_dsf.inference import tensors
from omi_dsf.inference.client import OipClient, ServiceUnavailable
from omi_dsf.inference.config import ServiceConfig
from omi_dsf.inference.service import LungSegModel, create_app
from omi_dsf.config import ConfigError, parse
from omi_dsf.testkit import phantom
from omi_dsf.testkit.ai_service import AiServiceProcess
from omi_dsf.tls import client_context
from test_registry import keys, token  # noqa: F401  (an RSA issuer and its tokens)

INFER = "/v2/models/lung-seg/infer"
HU = phantom.phantom_hu(4, 1, 64, 64)   # both lungs on every slice
SPACING = np.array([2.0, 1.0, 1.0], np.float32)
LIMITS = {"max_body_mb": 8, "max_json_mb": 1, "header_timeout": 1.5, "body_timeout": 1.5,
          "max_concurrent_infer": 1, "max_query_bytes": 2048}


def _message(binary: bool) -> tuple[bytes, dict]:
    head = {"id": "r1", "outputs": [{"name": "LUNG_VOLUME_ML"}], "parameters": {"binary_data_output": binary}}
    return tensors.encode(head, "inputs", {"HU": HU, "SPACING_MM": SPACING}, binary=binary)


JSON_BODY, _ = _message(False)
JSON_MSG = json.loads(JSON_BODY)
BIN_BODY, BIN_HEADERS = _message(True)
BIN_HEAD = json.loads(BIN_BODY[:int(BIN_HEADERS[tensors.HEADER_LENGTH])])
BIN_REST = BIN_BODY[int(BIN_HEADERS[tensors.HEADER_LENGTH]):]


@pytest.fixture(scope="module")
def default_service(ai_service):
    """`ai-service --anonymous`: the default limits (the session's, tests/conftest.py)."""
    return ai_service


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A service with small limits and short timeouts, so that each one is quick to reach."""
    folder = tmp_path_factory.mktemp("ai-limited")
    (folder / "ai.yaml").write_text(yaml.safe_dump({"auth": {"anonymous": True}, "limits": LIMITS, "max_slices": 40}))
    with AiServiceProcess(log=folder / "ai.log", args=("--config", str(folder / "ai.yaml")), timeout=60) as service:
        yield service


def _volumes(url: str) -> list[float]:
    with OipClient(url, timeout=30) as ai:
        return ai.infer("lung-seg", {"HU": HU, "SPACING_MM": SPACING}).outputs["LUNG_VOLUME_ML"].tolist()


def _head(method: str, path: str, headers: dict[str, str | int]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- limits on the real server --------------------------------------------------------------------

@pytest.mark.integration   # the AI service as a process
def test_512_mb_refused_before_the_body_is_read(default_service):
    before = rss_mb(default_service.proc.pid)
    head = _head("POST", INFER, {"Content-Type": "application/octet-stream", "Content-Length": 512 << 20,
                                 tensors.HEADER_LENGTH: 100})
    start = time.monotonic()
    answer = raw_request(default_service.port, head + b"\0" * (1 << 20), timeout=10)
    assert status_of(answer) == 413 and time.monotonic() - start < 5, answer[:300]
    assert b"limits.max_body_mb (320 MB)" in answer and b"connection: close" in answer.lower()
    assert rss_mb(default_service.proc.pid) - before < 30
    assert httpx.get(f"{default_service.url}/v2/health/ready", timeout=5).status_code == 200


@pytest.mark.integration   # the AI service as a process
def test_body_without_length_cut_off_at_the_limit(limited):
    head = _head("POST", INFER, {"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked",
                                 tensors.HEADER_LENGTH: 100})
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"\0" * (1 << 20))
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as s:
        s.sendall(head)
        try:
            for _ in range(20):   # 20 MB offered, 8 MB allowed
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = s.recv(65536)
    assert status_of(answer) == 413 and b"limits.max_body_mb (8 MB)" in answer


@pytest.mark.integration   # the AI service as a process
def test_json_part_limit(limited):
    big = json.dumps({"inputs": [{"name": "HU", "datatype": "INT16", "shape": [600000],
                                  "data": [0] * 600000}]}).encode()
    r = httpx.post(f"{limited.url}{INFER}", content=big, timeout=10)
    assert r.status_code == 413 and "limits.max_json_mb" in r.json()["error"]
    r = httpx.post(f"{limited.url}{INFER}", content=b"{}" + bytes(4), timeout=10,
                   headers={tensors.HEADER_LENGTH: str(2 << 20)})
    assert r.status_code == 413 and "send tensors as binary data" in r.json()["error"]


@pytest.mark.integration   # the AI service as a process
def test_long_query_is_414(limited):
    r = httpx.get(f"{limited.url}/v2/models/lung-seg", params={"x": "a" * 3000}, timeout=5)
    assert r.status_code == 414 and "limits.max_query_bytes (2048)" in r.json()["error"]


@pytest.mark.integration   # the AI service as a process
def test_slow_headers_and_bodies_are_cut_off(limited):
    # 200 connections with half-sent headers: each gets 408 after header_timeout; health answers meanwhile
    socks = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", limited.port), timeout=10)
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    start = time.monotonic()
    assert httpx.get(f"{limited.url}/v2/health/ready", timeout=2).status_code == 200
    answers = [s.recv(1024) for s in socks]
    for s in socks:
        s.close()
    assert all(status_of(a) == 408 for a in answers) and b"limits.header_timeout" in answers[0]
    assert time.monotonic() - start < 6
    # a body that stops half-way: 408 after body_timeout, not a request held for ever
    start = time.monotonic()
    answer = raw_request(limited.port, _head("POST", INFER, {"Content-Length": len(JSON_BODY)}) + JSON_BODY[:100],
                         timeout=10)
    assert status_of(answer) == 408 and b"limits.body_timeout" in answer and time.monotonic() - start < 5


@pytest.mark.integration   # the AI service as a process
def test_endless_headers_are_431(limited):
    answer = raw_request(limited.port, b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"X-Fill: " + b"a" * 40000, timeout=10)
    assert status_of(answer) == 431 and b"limits.max_header_bytes (16384)" in answer
    # an answer given before the body was read closes the connection (a trickling client cannot hold it)
    r = httpx.post(f"{limited.url}/v2/models/nope/infer", content=JSON_BODY, timeout=10)
    assert r.status_code == 404 and r.headers["connection"] == "close"


@pytest.mark.integration   # the AI service as a process
def test_inference_requests_at_once_are_limited(limited):
    # one inference request holds the only slot (its body is half sent): a second one is told to wait
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as held:
        held.sendall(_head("POST", INFER, {"Content-Length": len(JSON_BODY)}) + JSON_BODY[:100])
        time.sleep(0.3)
        r = httpx.post(f"{limited.url}{INFER}", content=JSON_BODY, timeout=10)
        assert r.status_code == 503 and "limits.max_concurrent_infer" in r.json()["error"]
        assert r.headers["Retry-After"] == "5"
        assert status_of(held.recv(1024)) == 408
    assert _volumes(limited.url)[0] > 0   # the slot is free again


# -- bounded fuzzing ------------------------------------------------------------------------------

paths = st.one_of(
    st.sampled_from(["/v2", INFER, "/v2/models/lung-seg", "/v2/models/lung-seg/ready", "/v2/health/live",
                     "/v2/models/lung-seg/versions/0.1.0/infer"]),
    st.tuples(st.sampled_from(["/v2/models/{}", "/v2/models/{}/infer", "/v2/models/lung-seg/versions/{}/infer",
                               "/{}", "/v2/health/{}"]), odd_text).map(lambda t: t[0].format(quote(t[1], safe="")))) 
header_values = st.one_of(odd_text.filter(lambda t: t.isascii() and t.isprintable()),
                          st.integers(-10, 1 << 40).map(str))
requests = st.one_of(
    st.builds(lambda doc: ("POST", INFER, {}, json.dumps(doc).encode()), mutated(JSON_MSG, 3)),
    st.builds(lambda doc, extra, length: (
        "POST", INFER, {tensors.HEADER_LENGTH: length if length is not None else str(len(json.dumps(doc)))},
        json.dumps(doc).encode() + BIN_REST + extra),
        mutated(BIN_HEAD, 3), st.binary(max_size=64), st.one_of(st.none(), header_values)),
    st.builds(lambda m, p, ct, enc, body: (m, p, {"Content-Type": ct, "Content-Encoding": enc}, body),
              st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]), paths, header_values,
              st.sampled_from(["identity", "gzip", "deflate", "br", "x"]),
              st.one_of(st.binary(max_size=256), json_values.map(lambda v: json.dumps(v).encode()))),
)


@pytest.mark.integration   # the AI service as a process
def test_fuzz_no_5xx_no_hang_health_and_results_unchanged(limited):
    expected = _volumes(limited.url)
    meta = httpx.get(f"{limited.url}/v2/models/lung-seg", timeout=5).json()
    answered: dict[int, int] = {}
    with httpx.Client(base_url=limited.url, timeout=15) as http:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(req=requests)
        def one(req):
            method, path, headers, body = req
            start = time.monotonic()
            r = http.request(method, path, content=body, headers=headers)
            assert time.monotonic() - start < 10
            assert r.status_code < 500 or (r.status_code == 503 and "limits." in r.text), (req, r.status_code, r.text)
            answered[r.status_code] = answered.get(r.status_code, 0) + 1

        one()
    print(f"fuzz answers by status: {dict(sorted(answered.items()))}")
    assert sum(answered.values()) >= 300 and set(answered) - {200} 
    assert httpx.get(f"{limited.url}/v2/health/ready", timeout=5).status_code == 200
    assert httpx.get(f"{limited.url}/v2/models/lung-seg", timeout=5).json() == meta
    assert _volumes(limited.url) == expected


# -- malformed requests, in process ----------------------------------------------------------------

@pytest.fixture
def ai():
    with TestClient(create_app([LungSegModel(max_slices=40)]), base_url="http://ai") as http:
        yield http


def _with(**changes) -> bytes:
    return json.dumps({**JSON_MSG, **changes}).encode()


@pytest.mark.parametrize("body, headers, status, message", [
    (_with(outputs={"name": "x"}), {}, 400, "'outputs' must be a list of objects"),
    (_with(outputs=["LUNG_LABELS"]), {}, 400, "'outputs' must be a list of objects"),
    (_with(outputs=[{"name": 7}]), {}, 400, "needs a 'name'"),
    (_with(outputs=[{"name": "LUNG_LABELS", "parameters": [1]}]), {}, 400, "an output's 'parameters' must be an object"),
    (_with(parameters=["binary_data_output"]), {}, 400, "'parameters' must be an object"),
    (_with(inputs={"HU": 1}), {}, 400, "'inputs' must be a list"),
    (_with(inputs=[{"name": "HU", "datatype": "INT16", "shape": [2, 2], "data": [[1, [2]], 3]}]), {}, 400, ""),
    (_with(inputs=[{"name": "HU", "datatype": "BYTES", "shape": [2], "data": [[1, [2]], "x"]}]), {}, 400, ""),
    (_with(inputs=[{"name": "HU", "datatype": "INT16", "shape": "big", "data": []}]), {}, 400, "shape must be"),
    (_with(inputs=[{"name": "HU", "datatype": "INT16", "shape": [10**12, 10**12], "data": [1]}]), {}, 400,
     "do not fill shape"),
    (b"[" * 100000 + b"]" * 100000, {}, 400, "nested too deeply"),
    (b"\xff\xfe", {}, 400, "not valid JSON"),
    (BIN_BODY, {tensors.HEADER_LENGTH: "-1"}, 400, "must be a number"),
    (BIN_BODY, {tensors.HEADER_LENGTH: "²".encode()}, 400, "must be a number"),
    (BIN_BODY, {tensors.HEADER_LENGTH: "١٢".encode()}, 400, "must be a number"),
    (BIN_BODY, {tensors.HEADER_LENGTH: "99999"}, 400, "outside the body"),
    (BIN_BODY, {tensors.HEADER_LENGTH: BIN_HEADERS[tensors.HEADER_LENGTH], "Content-Encoding": "gzip"}, 415,
     "Content-Encoding 'gzip' is not supported"),
    (_with(inputs=[{"name": "HU", "datatype": "INT16", "shape": [3, 16, 2000], "data": [0] * 96000},
                   {"name": "SPACING_MM", "datatype": "FP32", "shape": [3], "data": [1, 1, 1]}]), {}, 400,
     "the model accepts 16x16 to 1024x1024"),
])
def test_malformed_requests_are_4xx(ai, body, headers, status, message):
    r = ai.post(INFER, content=body, headers=headers)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_unknown_model_version_and_method(ai):
    assert ai.get(f"/v2/models/{'x' * 500}").status_code == 404
    assert len(ai.get(f"/v2/models/{'x' * 500}").json()["error"]) < 250
    assert ai.get("/v2/models/lung-seg/versions/9/ready").status_code == 404
    assert ai.delete(INFER).status_code == 405


# -- the ways in ------------------------------------------------------------------------------------

def test_no_way_in_is_refused(tmp_path):
    r = run_cli("ai-service", "--port", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no way in" in r.stderr and "--anonymous" in r.stderr
    with pytest.raises(ConfigError, match="no way in"):
        parse(ServiceConfig, {"auth": {"anonymous": False}}, tmp_path, "ai.yaml")


@pytest.mark.parametrize("data, message", [
    ({"auth": {"anonymous": "yes"}}, "ai.yaml: auth.anonymous: expected true or false, got 'yes'"),
    ({"auth": {"anonymous": True}, "limits": {"max_body_mb": "big"}}, "limits.max_body_mb: expected a number"),
    ({"auth": {"anonymous": True}, "limits": {"max_concurrent_infer": 0}}, "limits.max_concurrent_infer: must be"),
    ({"auth": {"anonymous": True}, "listen": {"port": 70000}}, "listen.port: must be less than or equal to 65535"),
    ({"auth": {"anonymous": True}, "tls": "on"}, "tls: expected a mapping"),
    ({"auth": {"jwt": [{"issuer": "x", "key_file": "missing.pem"}]}}, "auth.jwt[0].key_file: file"),
    ({"auth": {"anonymous": True}, "colour": "red"}, "colour: unknown key"),
])
def test_config_errors_name_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError, match=None) as info:
        parse(ServiceConfig, data, tmp_path, "ai.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bearer_tokens(tmp_path, keys):  # noqa: F811
    folder, key, other = keys
    cfg = parse(ServiceConfig, {"auth": {"jwt": [{"issuer": "https://idp.omi.test", "key_file": str(folder / "idp.pem")}]}},
                tmp_path, "ai.yaml")
    with TestClient(create_app([LungSegModel()], cfg), base_url="http://ai") as c:
        assert c.get("/v2/health/ready").status_code == 200 and c.get("/v2/models/lung-seg/ready").status_code == 200
        assert c.get("/v2/models/lung-seg").status_code == 401
        assert c.post(INFER, content=JSON_BODY).status_code == 401
        for claims in ({"iss": ["https://idp.omi.test"]}, {"iss": {"a": 1}}, {"iss": 7},
                       {"iss": "https://idp.omi.test", "exp": "soon"}, {"iss": "https://idp.omi.test", "exp": [1]}, {"iss": "https://idp.omi.test", "exp": -1}):
            bad = signed_token({"exp": time.time() + 300, **claims}, key)
            r = c.get("/v2/models/lung-seg", headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), (claims, r.text)
        assert c.get("/v2/models/lung-seg", headers={"Authorization": "Bearer not.a.jwt"}).status_code == 401
        assert c.get("/v2/models/lung-seg", headers={"Authorization": "Basic eDp5"}).status_code == 401
        stranger = token(other, iss="https://idp.omi.test")
        assert c.get("/v2/models/lung-seg", headers={"Authorization": f"Bearer {stranger}"}).status_code == 401
        good = token(key, iss="https://idp.omi.test")
        ai = OipClient("http://ai", http=c)
        c.headers["Authorization"] = f"Bearer {good}"
        assert ai.infer("lung-seg", {"HU": HU, "SPACING_MM": SPACING}).outputs["LUNG_VOLUME_ML"][0] > 0


@pytest.mark.integration   # the AI service as a process
def test_mutual_tls_and_a_token_over_tls(tmp_path, keys):  # noqa: F811
    from omi_dsf.steps.infer import _service
    from omi_dsf.steps.settings import step_settings

    folder, key, _ = keys
    ca_key, ca_cert = make_ca("ai test CA")
    ca = write_ca(tmp_path / "ca.pem", ca_cert)
    server = write_pem(tmp_path, "server", *issue(ca_key, ca_cert, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                                                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    client = write_pem(tmp_path, "client", *issue(ca_key, ca_cert, "provider worker", ExtendedKeyUsageOID.CLIENT_AUTH))
    (tmp_path / "ai.yaml").write_text(yaml.safe_dump({
        "tls": {"certfile": server[0], "keyfile": server[1], "client_ca": ca, "require_client_cert": True},
        "auth": {"jwt": [{"issuer": "https://idp.omi.test", "key_file": str(folder / "idp.pem")}]}}))
    mtls = client_context(ca, *client)
    with AiServiceProcess(log=tmp_path / "ai.log", args=("--config", str(tmp_path / "ai.yaml")), tls=mtls,
                          timeout=60) as service:
        assert service.url.startswith("https://")
        # the infer step's settings for this service: the site's CA and client certificate, a token file
        (tmp_path / "token").write_text(token(key, iss="https://idp.omi.test") + "\n")
        site = {"ai_services": {"lung-seg": {"url": service.url, "ca_file": ca, "client_cert": client[0],
                                             "client_key": client[1], "token_file": str(tmp_path / "token")}}}
        peer, model, _device, _grpc = _service({"ai-service-identifier": "lung-seg"}, step_settings(site), 30)
        with OipClient(peer) as ai:
            assert ai.infer(model, {"HU": HU, "SPACING_MM": SPACING}).outputs["LUNG_VOLUME_ML"][0] > 0
        # without a client certificate the handshake fails; a presented token must still be valid
        with OipClient(service.url, timeout=10, verify=client_context(ca)) as ai, pytest.raises(ServiceUnavailable):
            ai.server_metadata()
        with OipClient(service.url, timeout=10, verify=mtls, token="not.a.token") as ai:
            assert ai._status("GET", "/v2") == 401
        # plain HTTP to a TLS port gets nowhere
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{service.port}/v2", timeout=5)
