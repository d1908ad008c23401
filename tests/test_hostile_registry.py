"""The service registry against hostile input (issue 16): bounded fuzzing of the real server (mutual TLS,
as a provider, so that writes get past authentication), the limits (body size refused before it is read,
query length, header and body read timeouts), odd transaction and heartbeat shapes as 400, tokens with
odd claims as 401, configuration files with wrong types, and the status page (public_read, no addresses).
In process where the HTTP layer does not matter; the tests on `env` run `python -m omi_dsf registry`
(integration)."""

from __future__ import annotations

import json
import socket
import ssl
import time
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from helpers_hostile import json_values, mutated, odd_text, raw_request, rss_mb, signed_token, status_of
from omi_dsf.registry import definitions as d
from omi_dsf.registry.app import create_app
from omi_dsf.registry.config import parse_config
from omi_dsf.registry.entries import service_bundle
from omi_dsf.registry.search import PARAMS
from omi_dsf.config import ConfigError
from test_registry import AI, ISSUER, LUNG, bundle, diagnostics, hdr, keys, reg, register  # noqa: F401
from test_registry_integration import _client, env  # noqa: F401  (the registry over mutual TLS)

FHIR = {"Content-Type": "application/fhir+json"}


# -- odd shapes, in process ---------------------------------------------------------------------------

def _bundle_with(change) -> dict:
    b = bundle()
    change(b)
    return b


@pytest.mark.integration   # the session's FHIR store
@pytest.mark.parametrize("change, named", [
    (lambda b: b["entry"][0].update(request=[{"method": "PUT"}]), "Bundle.entry[0].request must be an object"),
    (lambda b: b["entry"][0]["request"].update(url={"x": 1}), "Bundle.entry[0].request must be an object with a method and a url"),
    (lambda b: b["entry"][0]["request"].update(url=7), "Bundle.entry[0].request"),
    (lambda b: b["entry"][0]["request"].update(method=["PUT"]), "Bundle.entry[0].request.method must be POST or PUT"),
    (lambda b: b["entry"][0].update(fullUrl=["urn:uuid:x"]), "Bundle.entry[0].fullUrl must be a string"),
    (lambda b: b["entry"][2]["resource"].update(extension=None), "HealthcareService.extension: null is not allowed"),
    (lambda b: b["entry"][2]["resource"]["endpoint"][0].update(reference=None),
     "HealthcareService.endpoint[0].reference: null is not allowed"),
    (lambda b: b["entry"][0]["resource"].update(deviceName=[None]), "Device.deviceName[0]: null"),
    (lambda b: b.update(entry={"0": b["entry"][0]}), "Bundle.entry is empty"),
    (lambda b: b["entry"].append("entry"), "Bundle.entry[3] is not an object"),
])
def test_odd_transaction_shapes_are_400(reg, keys, change, named):
    r = reg.post("/fhir", content=json.dumps(_bundle_with(change)), headers=hdr(keys[1]))
    assert r.status_code == 400 and named in diagnostics(r), r.text


@pytest.mark.integration   # the session's FHIR store
@pytest.mark.parametrize("body, named", [
    ([], "takes an optional Parameters resource"),
    ({"resourceType": "Parameters", "parameter": {"name": "note"}}, "Parameters.parameter must be a list of objects"),
    ({"resourceType": "Parameters", "parameter": ["note"]}, "Parameters.parameter must be a list of objects"),
    ({"resourceType": "Parameters", "parameter": [{"name": "note", "valueString": ["x"]}]}, "needs a valueString"),
    ({"resourceType": "Parameters", "parameter": [{"name": "note"}]}, "needs a valueString"),
])
def test_odd_heartbeat_shapes_are_400(reg, keys, body, named):
    register(reg, keys[1])
    r = reg.post("/fhir/HealthcareService/lung-seg/$heartbeat", content=json.dumps(body), headers=hdr(keys[1]))
    assert r.status_code == 400 and named in diagnostics(r)
    ok = {"resourceType": "Parameters", "parameter": [{"name": "note", "valueString": "fine"}]}
    r = reg.post("/fhir/HealthcareService/lung-seg/$heartbeat", content=json.dumps(ok), headers=hdr(keys[1]))
    assert r.status_code == 200


@pytest.mark.integration   # the session's FHIR store
@pytest.mark.parametrize("claims", [{"iss": [ISSUER]}, {"iss": {"url": ISSUER}}, {"iss": 1}, {"iss": None},
                                    {"iss": ISSUER, "exp": "tomorrow"}, {"iss": ISSUER, "aud": {"a": 1}},
                                    {"iss": ISSUER, "organization": ["ai.omi.test"]}])
def test_tokens_with_odd_claims_are_refused(reg, keys, claims):
    tok = signed_token({"exp": int(time.time()) + 300, "aud": "omi-registry", "organization": AI, **claims}, keys[1])
    r = reg.post("/fhir", content=json.dumps(bundle()), headers={**FHIR, "Authorization": f"Bearer {tok}"})
    assert r.status_code in (401, 403) and r.json()["resourceType"] == "OperationOutcome", r.text


@pytest.mark.integration   # the session's FHIR store
def test_limits_in_process(reg, keys):
    r = reg.post("/fhir", content=b" " * ((1 << 20) + 1), headers=hdr(keys[1]))
    assert r.status_code == 413 and "limits.max_body_mb (1 MB)" in diagnostics(r)
    assert r.json()["issue"][0]["code"] == "too-costly"
    r = reg.get("/fhir/HealthcareService", params={"name": "x" * 9000})
    assert r.status_code == 414 and "limits.max_query_bytes (8192)" in diagnostics(r)
    r = reg.post("/fhir", content=b"[" * 50000 + b"]" * 50000, headers=hdr(keys[1]))
    assert r.status_code == 400 and "nested too deeply" in diagnostics(r)
    r = reg.get("/fhir/HealthcareService", params={"_count": "²"})
    assert r.status_code == 400 and "_count" in diagnostics(r)


@pytest.mark.integration   # the session's FHIR store
def test_page_honours_public_read_and_shows_no_addresses(tmp_path, keys, fhir_store):
    folder, key, _ = keys
    cfg = parse_config({"fhir_store": {"url": fhir_store.state().base_url}, "health": {"interval": 0},
                        "auth": {"public_read": False, "jwt": [{"issuer": ISSUER, "key_file": str(folder / "idp.pem"),
                                                                 "audience": "omi-registry"}]}}, tmp_path)
    app = create_app(cfg, run_checks=False)
    with TestClient(app, base_url="http://registry.test") as c:
        app.state.store.clear()
        register(c, key, bundle(oip="https://10.20.30.40:8500/internal/"))
        app.state.store.record_check("lung-seg", "down", 12.0, "unreachable: ServiceUnavailable: GET "
                                     "https://10.20.30.40:8500/internal/v2/health/ready: ConnectError: refused")
        for path in ("/", "/fhir/HealthcareService", "/fhir/Endpoint/x"):
            r = c.get(path)
            assert r.status_code == 401 and "10.20.30.40" not in r.text, path
        page = c.get("/", headers=hdr(key))
        assert page.status_code == 200 and 'data-service="lung-seg"' in page.text
        assert "unreachable: ServiceUnavailable" in page.text
        assert "10.20.30.40" not in page.text and "https://" not in page.text.split("<body>")[1]
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize("data, named", [
    ({"tls": "yes"}, "tls: expected a mapping"),
    ({"tls": {"certfile": 5, "keyfile": "k"}}, "tls.certfile: expected a file name"),
    ({"auth": {"jwt": "issuer"}}, "auth.jwt: expected a list"),
    ({"auth": {"jwt": [{"issuer": ["a"], "key_file": "k"}]}}, "auth.jwt[0].issuer: expected a string"),
    ({"auth": {"organizations": ["a"]}}, "auth.organizations: expected a mapping"),
    ({"auth": {"public_read": "no"}}, "auth.public_read: expected true or false, got 'no'"),
    ({"health": {"interval": "30s"}}, "health.interval: expected a number, got '30s'"),
    ({"health": {"timeout": 0}}, "health.timeout: must be greater than 0"),
    ({"health": {"client_cert": "/etc/hostname"}}, "health: client_cert needs client_key"),
    ({"limits": {"max_concurrent": 1.5}}, "limits.max_concurrent: expected an integer, got 1.5"),
    ({"limits": {"header_timeout": True}}, "limits.header_timeout: expected a number, got True"),
    ({"port": "8700"}, "port: expected an integer, got '8700'"),
    ({"public_url": "javascript:alert(1)"}, "public_url: must be an http(s) URL"),
    ({"fhir_store": "http://127.0.0.1:8090/fhir"}, "fhir_store: expected a mapping"),
    ({"fhir_store": {"url": "ftp://fhir"}}, "fhir_store.url: must be an http(s) URL"),
    ({"fhir_store": {"url": "http://127.0.0.1:8090/fhir", "ca_file": "nope.pem"}}, "fhir_store.ca_file: file"),
])
def test_config_with_wrong_types_names_the_key(tmp_path, data, named):
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path, "registry.yaml")
    assert str(info.value) == f"registry.yaml: {named}" or str(info.value).startswith(f"registry.yaml: {named}")


# -- limits on the real server ----------------------------------------------------------------------

def _tls(env) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=env["ca"])


@pytest.mark.integration   # the registry and the AI service as processes (env)
def test_512_mb_refused_before_the_body_is_read(env):
    before = rss_mb(env["reg"].pid)
    head = (b"POST /fhir HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\n"
            b"Content-Length: %d\r\n\r\n" % (512 << 20))
    start = time.monotonic()
    answer = raw_request(env["port"], head + b" " * (1 << 20), tls=_tls(env), timeout=10)
    assert status_of(answer) == 413 and time.monotonic() - start < 5, answer[:300]
    assert b"limits.max_body_mb (1 MB)" in answer and b"OperationOutcome" in answer
    assert rss_mb(env["reg"].pid) - before < 30
    with _client(env, None) as c:
        assert c.get("/health").status_code == 200


@pytest.mark.integration   # the registry and the AI service as processes (env)
def test_slow_headers_and_bodies_are_cut_off(env):
    socks = []
    for _ in range(50):
        raw = socket.create_connection(("127.0.0.1", env["port"]), timeout=10)
        s = _tls(env).wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        socks.append(s)
    start = time.monotonic()
    with _client(env, None) as c:
        assert c.get("/health").status_code == 200 and time.monotonic() - start < 2
    answers = [s.recv(1024) for s in socks]
    for s in socks:
        s.close()
    assert all(status_of(a) == 408 for a in answers) and time.monotonic() - start < 6
    answer = raw_request(env["port"], b"GET /health HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 40000, tls=_tls(env))
    assert status_of(answer) == 431
    body = json.dumps(bundle()).encode()
    head = b"POST /fhir HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\nContent-Length: %d\r\n\r\n"
    start = time.monotonic()
    answer = raw_request(env["port"], head % len(body) + body[:50], tls=_tls(env), timeout=10)
    assert status_of(answer) in (401, 408), answer[:300]   # no certificate: refused before the body is read
    with _client(env, "provider") as c:   # a provider's partial POST: 408 after body_timeout
        ctx = c._transport._pool._ssl_context
    answer = raw_request(env["port"], head % len(body) + body[:50], tls=ctx, timeout=10)
    assert status_of(answer) == 408 and b"limits.body_timeout" in answer and time.monotonic() - start < 8


# -- bounded fuzzing, over mutual TLS as a provider ------------------------------------------------

FUZZ = service_bundle(AI, "fuzz-seg", name="Fuzz", model="lung-seg", model_version="0.1.0",
                      oip_url="http://127.0.0.1:9/", modality=["CT"], body_site=[LUNG])
BASELINE = service_bundle(AI, "baseline-seg", name="Baseline", model="lung-seg", model_version="0.1.0",
                          oip_url="http://127.0.0.1:9/", modality=["CT"], body_site=[LUNG],
                          identifier_system="http://example.org/baseline")
RESOURCES = [e["resource"] for e in FUZZ["entry"]]
SEARCH_KEYS = sorted({f"{n}{m}" for params in PARAMS.values() for n in params for m in ("", ":contains", ":exact", ":x")}
                     | {"_count", "_offset", "_include", "_format", "_sort"})
segment = odd_text.map(lambda t: quote(t, safe=""))

requests = st.one_of(
    st.builds(lambda doc: ("POST", "/fhir", FHIR, json.dumps(doc)), mutated(FUZZ, 3)),
    st.integers(0, len(RESOURCES) - 1).flatmap(lambda i: st.tuples(st.just(RESOURCES[i]), mutated(RESOURCES[i], 2),
                                                                   st.booleans())).map(
        lambda t: ("PUT", f"/fhir/{t[0]['resourceType']}/{t[0]['id']}", FHIR, json.dumps(t[1])) if t[2]
        else ("POST", f"/fhir/{t[0]['resourceType']}", FHIR, json.dumps(t[1]))),
    st.builds(lambda body: ("POST", "/fhir/HealthcareService/fuzz-seg/$heartbeat", FHIR, json.dumps(body)),
              st.one_of(json_values, mutated({"resourceType": "Parameters",
                                              "parameter": [{"name": "note", "valueString": "ok"}]}, 2))),
    st.builds(lambda t, q: ("GET", f"/fhir/{t}", {}, None, q),
              st.sampled_from(["HealthcareService", "Device", "Endpoint", "Patient"]),
              st.lists(st.tuples(st.one_of(st.sampled_from(SEARCH_KEYS), odd_text), odd_text), max_size=4)),
    st.builds(lambda m, p, ct, body: (m, p, {"Content-Type": ct}, body),
              st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
              st.one_of(st.sampled_from(["/", "/fhir", "/fhir/metadata", "/health"]),
                        st.tuples(st.sampled_from(["/fhir/{}", "/fhir/HealthcareService/{}", "/fhir/{}/x",
                                                   "/fhir/HealthcareService/{}/$heartbeat"]), segment)
                        .map(lambda t: t[0].format(t[1]))),
              st.sampled_from(["application/fhir+json", "application/json", "text/html", "", "multipart/form-data"]),
              st.one_of(st.binary(max_size=200), json_values.map(json.dumps))),
)


def _stored(c: httpx.Client) -> dict:
    out = {}
    for e in BASELINE["entry"]:
        rtype, rid = e["resource"]["resourceType"], e["request"]["url"].split("/")[1]
        r = c.get(f"/fhir/{rtype}/{rid}")
        assert r.status_code == 200, r.text
        res = r.json()
        res["extension"] = [x for x in res.get("extension", []) if x.get("url") != d.EXT_HEALTH]
        out[f"{rtype}/{rid}"] = res
    return out


@pytest.mark.integration   # the registry and the AI service as processes (env)
def test_fuzz_no_5xx_no_hang_health_and_stored_data_unchanged(env):
    answered: dict[int, int] = {}
    with _client(env, "provider") as c:
        for b in (BASELINE, FUZZ):
            assert c.post("/fhir", json=b, headers=FHIR).status_code == 200
        before = _stored(c)
        c.timeout = httpx.Timeout(15)

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(req=requests)
        def one(req):
            method, path, headers, body, *query = req
            start = time.monotonic()
            r = c.request(method, path, content=body, headers=headers, params=query[0] if query else None)
            assert time.monotonic() - start < 10
            assert r.status_code < 500, (req, r.status_code, r.text[:500])
            answered[r.status_code] = answered.get(r.status_code, 0) + 1

        one()
        assert c.get("/health").status_code == 200
        assert _stored(c) == before
    print(f"fuzz answers by status: {dict(sorted(answered.items()))}")
    assert sum(answered.values()) >= 300 and len(set(answered)) > 3
    assert "Traceback" not in env["reg_log"].read_text()
