"""One way to talk to a peer: omi_dsf/peer.py opens every HTTP client to one (httpx), and
omi_dsf/dicomweb_client.py is the one DICOMweb client; its error mapping and the Peer's
configuration checks."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import httpx
import pytest

from helpers_source import parsed
from omi_dsf.dicomweb_client import (AnswerTruncated, BadAnswer, DicomwebBusy, DicomwebClient, DicomwebRefused,
                                     check_status)
from omi_dsf.config import ConfigError, PeerSettings, parse
from omi_dsf.errors import RetryableError
from omi_dsf.peer import Peer, PeerConfigError, PeerTlsError, PeerUnreachable

ROOT = Path(__file__).resolve().parent.parent / "omi_dsf"
ONE_PLACE = "peer.py"
# Modules that may still build an HTTP client themselves, each with its reason: none (the test bed,
# the FHIR store's launcher and the harness's launchers use peer.http_client / Peer.client too).
NOT_PEERS: dict[str, str] = {}
CLIENT_CLASSES = {"Client", "AsyncClient"}
# httpx's module-level calls, each of which opens a client of its own
CLIENT_FUNCTIONS = {"get", "post", "put", "patch", "delete", "head", "options", "request", "stream"}
OTHER_HTTP_LIBRARIES = {"requests", "urllib.request", "urllib3", "aiohttp", "http.client", "dicomweb_client"}


def _http_uses(path: Path) -> list[str]:
    """httpx.Client/AsyncClient constructions and imports of other HTTP libraries in one module."""
    found = []
    tree = parsed(path)
    from_httpx = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name in OTHER_HTTP_LIBRARIES or a.name.split(".")[0] in {"requests", "dicomweb_client"}]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "httpx":
                from_httpx |= {a.asname or a.name for a in node.names if a.name in CLIENT_CLASSES | CLIENT_FUNCTIONS}
            elif node.module in OTHER_HTTP_LIBRARIES or node.module.split(".")[0] in {"requests", "dicomweb_client"}:
                found.append(f"from {node.module} import …")
        elif isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in CLIENT_CLASSES | CLIENT_FUNCTIONS
                    and isinstance(f.value, ast.Name) and f.value.id == "httpx") \
                    or (isinstance(f, ast.Name) and f.id in from_httpx):
                found.append(f"httpx.{getattr(f, 'attr', getattr(f, 'id', '?'))}(…) at line {node.lineno}")
    return found


def http_sessions() -> dict[str, list[str]]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        uses = _http_uses(path)
        if uses:
            out[path.relative_to(ROOT).as_posix()] = uses
    return out


def test_one_module_opens_http_clients_to_peers():
    found = http_sessions()
    assert ONE_PLACE in found   # the rule would be vacuous otherwise
    bad = {m: u for m, u in found.items() if m != ONE_PLACE and m not in NOT_PEERS}
    assert not bad, "HTTP clients built outside omi_dsf/peer.py (use Peer.client or peer.http_client):\n" + \
        "\n".join(f"  {m}: {', '.join(u)}" for m, u in sorted(bad.items()))


def test_the_rule_sees_each_way_of_building_a_client(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import httpx\nimport requests\nfrom httpx import Client as C\nimport urllib.request\n"
                      "a = httpx.Client()\nb = C()\nc = httpx.AsyncClient()\nfrom dicomweb_client.api import X\n"
                      "d = httpx.get('http://x')\n")
    uses = _http_uses(sample)
    assert sum(u.startswith("httpx.") for u in uses) == 4
    assert {"import requests", "import urllib.request", "from dicomweb_client.api import …"} <= set(uses)


def test_dicomweb_transactions_live_in_one_client():
    """No other module of omi_dsf speaks QIDO/WADO/STOW by hand: the multipart Accept/Content-Type
    of a WADO or STOW request and the DICOM JSON Accept appear in the one client only (and the
    gateway, which answers them)."""
    marker = 'multipart/related; type="application/dicom"'
    outside = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")
               if marker in p.read_text() and p.name != "dicomweb_client.py"
               and not p.relative_to(ROOT).as_posix().startswith(("dicomweb/", "testkit/"))]
    assert not outside, outside


# -- the error mapping ---------------------------------------------------------------------------

def _client(handler) -> DicomwebClient:
    return DicomwebClient(http=httpx.Client(transport=httpx.MockTransport(handler)), url="https://gw.test")


@pytest.mark.parametrize("status,error,retryable", [
    (500, DicomwebBusy, True), (503, DicomwebBusy, True), (429, DicomwebBusy, True),
    (400, DicomwebRefused, False), (401, DicomwebRefused, False), (403, DicomwebRefused, False),
    (404, DicomwebRefused, False), (409, DicomwebRefused, False), (413, DicomwebRefused, False),
])
def test_http_status_maps_to_one_error_each(status, error, retryable):
    dw = _client(lambda request: httpx.Response(status, json={"error": "why"}))
    with pytest.raises(error) as raised:
        dw.search_for_series("1.2.3")
    assert raised.value.status == status and isinstance(raised.value, RetryableError) is retryable
    if error is DicomwebRefused:
        assert raised.value.reason == "why"


def test_stow_answers_200_202_409_and_raises_otherwise():
    for status in (200, 202, 409):
        answer = _client(lambda request, s=status: httpx.Response(s, json={"00081198": {"vr": "SQ"}}))\
            .store_instances([b"x"])
        assert answer.status == status and "00081198" in answer.answer
    with pytest.raises(DicomwebRefused) as raised:
        _client(lambda request: httpx.Response(413)).store_instances([b"x"], "1.2.3")
    assert raised.value.status == 413
    with pytest.raises(DicomwebBusy):
        _client(lambda request: httpx.Response(502)).store_instances([b"x"])


def test_stow_body_is_sent_in_pieces_with_its_length():
    """The instances' bytes go out as they are (not joined into one body first), with a
    Content-Length: not chunked, which some STOW-RS servers refuse."""
    from omi_dsf.dicomweb.multipart import iter_bodies

    seen = {}

    def answer(request):
        seen["headers"], seen["body"] = request.headers, request.read()
        return httpx.Response(200, json={})
    instances = [b"first" * 1000, b"second", b"\r\n--not-a-boundary\r\n"]
    _client(answer).store_instances(instances, "1.2.3")
    assert int(seen["headers"]["content-length"]) == len(seen["body"])
    assert "transfer-encoding" not in seen["headers"]
    assert list(iter_bodies(seen["headers"]["content-type"], iter([seen["body"]]))) == instances


def test_empty_search_answers_and_bad_ones():
    assert _client(lambda request: httpx.Response(204)).search_for_studies() == []
    assert _client(lambda request: httpx.Response(200, content=b"")).search_for_instances("1.2") == []
    with pytest.raises(BadAnswer, match="not JSON"):
        _client(lambda request: httpx.Response(200, content=b"<html>")).search_for_studies()
    with pytest.raises(BadAnswer, match="not a DICOM JSON list"):
        _client(lambda request: httpx.Response(200, json={"a": 1})).search_for_studies()


def test_search_parameters_and_paths():
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, json=[])

    dw = _client(answer)
    dw.search_for_instances("1.2", fields=["00080018"], limit=10, offset=20)
    dw.search_for_studies(fields=["00201208"], search_filters={"StudyInstanceUID": "1.2"})
    assert seen[0].path == "/studies/1.2/instances"
    assert seen[0].params.get_list("includefield") == ["00080018"] and seen[0].params["offset"] == "20"
    assert seen[1].path == "/studies" and seen[1].params["StudyInstanceUID"] == "1.2"
    assert "includedefaults" not in seen[0].params
    dw.search_for_instances("1.2", fields=["00080018"], include_defaults=False)
    assert seen[2].params.get_list("includedefaults") == ["false"]


def test_wado_streams_parts_and_tells_cut_off_from_malformed():
    body = b"--B\r\nContent-Type: application/dicom\r\n\r\nabc\r\n--B\r\nContent-Type: application/dicom\r\n\r\ndef\r\n--B--\r\n"
    ctype = 'multipart/related; type="application/dicom"; boundary=B'
    ok = _client(lambda request: httpx.Response(200, content=body, headers={"Content-Type": ctype}))
    assert ok.retrieve_series("1", "2") == [b"abc", b"def"]
    cut = _client(lambda request: httpx.Response(200, content=body[:60], headers={"Content-Type": ctype}))
    with pytest.raises(AnswerTruncated) as raised:
        cut.retrieve_study("1")
    assert isinstance(raised.value, RetryableError)
    wrong = _client(lambda request: httpx.Response(200, json=[], headers={"Content-Type": "application/dicom+json"}))
    with pytest.raises(BadAnswer, match="not multipart/related") as raised:
        wrong.retrieve_study("1")
    assert not isinstance(raised.value, RetryableError)
    assert _client(lambda request: httpx.Response(204)).retrieve_study("1") == []


def test_no_answer_is_retryable():
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    with pytest.raises(PeerUnreachable) as raised:
        _client(refuse).search_for_studies()
    assert isinstance(raised.value, RetryableError)
    with pytest.raises(PeerTlsError, match="not trusted by the configured ca_file"):
        def untrusted(request):
            raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                     "unable to get local issuer certificate (_ssl.c:1000)")
        _client(untrusted).search_for_studies()


# -- Peer configuration ---------------------------------------------------------------------------

class _Block(PeerSettings):
    url: str = ""


def _peer(cfg: dict, where: str, base=None) -> Peer:
    """A peer as a configuration block (the peer keys and a url) gives it; ConfigError names the key."""
    block = parse(_Block, cfg, base or Path.cwd(), "site.yaml")
    return block.peer(block.url, where)


def test_peer_configuration_names_the_key(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a CA")
    where = "steps.providers.ai"
    with pytest.raises(PeerConfigError, match=f"{where}: no URL"):
        _peer({}, where)
    with pytest.raises(PeerConfigError, match="is not an http"):
        _peer({"url": "ftp://x"}, where)
    with pytest.raises(ConfigError, match=r"site.yaml: ca_file: file .*missing.pem does not exist"):
        _peer({"url": "https://x", "ca_file": str(tmp_path / "missing.pem")}, where)
    with pytest.raises(ConfigError, match="client_cert and client_key go together"):
        _peer({"url": "https://x", "client_cert": str(ca)}, where)
    with pytest.raises(ConfigError, match="site.yaml: timeout: expected a number, got 'soon'"):
        _peer({"url": "https://x", "timeout": "soon"}, where)
    with pytest.raises(ConfigError, match="site.yaml: timeout: must be greater than 0"):
        _peer({"url": "https://x", "timeout": 0}, where)
    with pytest.raises(ConfigError, match="site.yaml: tiemout: unknown key"):
        _peer({"url": "https://x", "tiemout": 5}, where)
    with pytest.raises(PeerConfigError, match="cannot load its TLS files"):
        _peer({"url": "https://x", "ca_file": str(ca)}, where).ssl_context()
    peer = _peer({"url": "https://gw/dicom-web/", "ca_file": "ca.pem", "timeout": 5}, where, base=tmp_path)
    assert (peer.url, peer.ca_file, peer.timeout) == ("https://gw/dicom-web", str(ca), 5.0)


def test_old_key_names_translate_with_a_warning(tmp_path, caplog):
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem"))
    for f in (ca, cert, key):
        f.write_text("x")
    caplog.set_level(logging.WARNING, logger="omi_dsf.config")
    peer = _peer({"url": "https://x", "verify": str(ca), "cert": str(cert), "key": str(key)}, "old.block")
    assert (peer.ca_file, peer.client_cert, peer.client_key) == (str(ca), str(cert), str(key))
    assert "the peer key 'verify' is deprecated: write ca_file instead" in caplog.text
    assert _peer({"url": "https://x", "verify": True}, "old.block").ca_file is None
    with pytest.raises(ConfigError, match="verify: false is not supported"):
        _peer({"url": "https://x", "verify": False}, "old.block")


def test_peer_client_carries_the_token_and_shares_tls_contexts(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    peer = _peer({"url": "https://x", "token_file": str(token)}, "p")
    with peer.client() as one, Peer("https://y").client() as two:
        assert one.headers["Authorization"] == "Bearer s3cret" and "Authorization" not in two.headers
        assert one._transport._pool._ssl_context is two._transport._pool._ssl_context
        assert one.base_url == "https://x" and not one._trust_env


def test_json_answer_names_what_is_wrong():
    from omi_dsf.peer import json_answer

    class Wrong(Exception):
        pass

    ok = httpx.Response(200, json={"resourceType": "Bundle", "total": 0})
    assert json_answer(ok, "search", Wrong, "Bundle")["total"] == 0
    assert json_answer(httpx.Response(200, json={"a": 1}), "meta", Wrong) == {"a": 1}
    for response, wrong in ((httpx.Response(200, content=b"<html>"), "search: the answer is not JSON"),
                            (httpx.Response(200, json=[1]), "search: the answer is not a JSON object"),
                            (ok, "search: the answer is not a Parameters resource")):
        with pytest.raises(Wrong) as raised:
            json_answer(response, "search", Wrong, "Parameters" if response is ok else None)
        assert str(raised.value) == wrong


def test_a_dsf_answer_cut_off_is_a_retryable_connection_error():
    from omi_dsf.dsf.client import _body
    from omi_dsf.dsf.errors import DsfBadAnswer, DsfConnectionError

    cut = httpx.Response(200, content=b'{"resourceType": "Bundle", "entry": [{"reso')
    with pytest.raises(DsfConnectionError) as raised:       # the worker releases the item and retries
        _body(cut, "GET QuestionnaireResponse?")
    assert isinstance(raised.value, DsfBadAnswer) and "not JSON" in str(raised.value)
    assert _body(httpx.Response(200, json={"resourceType": "Bundle"}), "x") == {"resourceType": "Bundle"}
