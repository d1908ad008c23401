"""The send step's DICOMweb source (QIDO-RS listing, then WADO-RS): the multipart answer parsed as it streams, and what a
broken answer becomes (a step error, or a retry when it was cut off)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import pydicom
import pytest

from helpers_http import serve
from helpers_provider import PROVIDER, instances_at, provider_gateway
from omi_dsf.deid.dicomweb_io import WadoStudySource, WadoTruncated
from omi_dsf.dicomweb_client import DicomwebBusy, DicomwebClient, read_ahead
from omi_dsf.deid.instance_io import SourceError
from omi_dsf.errors import RetryableError
from omi_dsf.peer import Peer
from omi_dsf.steps.api import StepContext, StepError
from omi_dsf.steps.send import send
from omi_dsf.testkit.phantom import write_ct_study

B = "b0undary"


def _body(blobs: list[bytes], close: bool = True) -> bytes:
    parts = b"".join(f"--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b + b"\r\n" for b in blobs)
    return b"preamble\r\n" + parts + (f"--{B}--\r\n".encode() if close else b"")


def _listing(blobs: list[bytes]) -> bytes:
    """The instance-level QIDO-RS answer for the study of `blobs`."""
    found = []
    for blob in blobs:
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(blob), stop_before_pixels=True)
        found.append({tag: {"vr": "UI", "Value": [str(ds[kw].value)]} for tag, kw in
                      (("0020000D", "StudyInstanceUID"), ("0020000E", "SeriesInstanceUID"),
                       ("00080018", "SOPInstanceUID"))})
    return json.dumps(found).encode()


def _handler(status: int, body: bytes, ctype: str = f'multipart/related; type="application/dicom"; boundary={B}',
             listing: bytes | None = None):
    class H(BaseHTTPRequestHandler):
        seen: list[tuple[str, str]] = []

        def do_GET(self):
            H.seen.append((self.path, self.headers.get("Accept", "")))
            if listing is not None and self.path.split("?")[0].endswith("/instances"):
                time.sleep(0.2)     # a PACS's C-FIND takes a while: a reading alongside would come first
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(listing)))
                self.end_headers()
                self.wfile.write(listing)
                H.seen.append(("listed", ""))
                return
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 7000):   # small writes: parts span chunks
                self.wfile.write(body[i:i + 7000])

        def log_message(self, *args):
            pass
    return H


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    paths = write_ct_study(tmp_path_factory.mktemp("wado") / "in", slices=3, rows=32, cols=32, seed=5)
    return [p.read_bytes() for p in paths], pydicom.dcmread(paths[0])


def _items(url: str) -> list[tuple[str, bytes]]:
    return list(WadoStudySource(DicomwebClient(Peer(url, timeout=10)), "1.2.3"))


def test_instances_arrive_as_their_bytes_in_order(study):
    blobs, _ = study
    handler = _handler(200, _body(blobs))
    with serve(handler) as url:
        items = _items(url)
    assert [data for _, data in items] == blobs
    assert [name for name, _ in items] == ["WADO-RS instance 1", "WADO-RS instance 2", "WADO-RS instance 3"]
    path, accept = handler.seen[0]
    assert path == "/studies/1.2.3" and 'type="application/dicom"' in accept


def test_answer_cut_off_inside_a_part_is_transient(study):
    blobs, _ = study
    body = _body(blobs, close=False)[:-500]
    with serve(_handler(200, body)) as url:
        with pytest.raises(WadoTruncated, match="ended after 2 instances"):
            _items(url)
    assert issubclass(WadoTruncated, ConnectionError) and issubclass(WadoTruncated, RetryableError)  # retried


@pytest.mark.parametrize("status,body,ctype,message", [
    (404, b"", "application/json", "failed: HTTP 404"),
    (200, b"{}", "application/dicom+json", "not multipart/related"),
    (200, b"no delimiter at all", f"multipart/related; boundary={B}", "boundary not found"),
    (200, b"x", "multipart/related", "missing or bad multipart boundary"),
])
def test_bad_answers_are_source_errors(status, body, ctype, message):
    with serve(_handler(status, body, ctype)) as url:
        with pytest.raises(SourceError, match=message):
            _items(url)


def test_server_error_is_left_to_the_retry():
    with serve(_handler(503, b"busy", "text/plain")) as url:
        with pytest.raises(DicomwebBusy):
            _items(url)


def test_step_over_wado_source(study, tmp_path):
    blobs, first = study
    key = tmp_path / "key"
    key.write_text("wado-source-test-key-0123456789")
    site = {"pseudonymization": {
        "domain": "omi-wado", "key_file": str(key), "store": str(tmp_path / "site.sqlite"),
        "source": {"kind": "dicomweb"}}}
    inputs = {"study-instance-uid": str(first.StudyInstanceUID), "provider-organization": PROVIDER}
    with provider_gateway(tmp_path / "provider") as provider:
        site["providers"] = provider["providers"]
        handler = _handler(200, _body(blobs), listing=_listing(blobs))
        with serve(handler) as url:
            ctx = StepContext(topic="send", business_key="bk", site={**site, "gateway_url": url},
                              outputs=("instance-count", "byte-count", "pseudonymized-study-instance-uid"))
            out = send(inputs, ctx)
        assert out["instance-count"] == 3
        # the listing is answered before the WADO-RS request is made (a PACS may serve a C-FIND
        # only after a C-GET of the study, which waits for the reader: never alongside)
        assert [path.split("?")[0].rsplit("/", 1)[-1] for path, _ in handler.seen] == [
            "instances", "listed", str(first.StudyInstanceUID)]
        written = instances_at(provider["store"], out["pseudonymized-study-instance-uid"])
        assert len(written) == 3
        ds = pydicom.dcmread(written[0])
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientName != first.PatientName
        # a broken answer fails the step with the reason, and nothing is sent
        site["pseudonymization"]["domain"] = "omi-wado-2"
        with serve(_handler(200, b"garbage", "text/html", listing=_listing(blobs))) as url:
            with pytest.raises(StepError, match="not multipart/related"):
                send(inputs, StepContext(topic="send", business_key="bk2", site={**site, "gateway_url": url}))
        from omi_dsf.deid.deidentify import uid_for
        assert instances_at(provider["store"], uid_for(key.read_bytes().strip(), "omi-wado-2",
                                                       str(first.StudyInstanceUID))) == []


def _counting(n: int, produced: list, closed: list, fail_at: int | None = None):
    try:
        for i in range(n):
            if i == fail_at:
                raise ConnectionResetError("cut")
            produced.append(i)
            yield i
    finally:
        closed.append(True)


def _reader_threads() -> int:
    return sum(t.name == "omi-read-ahead" for t in threading.enumerate())


def test_read_ahead_reads_ahead_of_a_slow_caller_and_stops_with_it():
    produced, closed = [], []
    items = read_ahead(_counting(100, produced, closed), 4)
    assert next(items) == 0
    time.sleep(0.3)                      # the caller is busy with item 0; the thread goes on reading
    assert 3 <= len(produced) <= 1 + 4 + 1, produced   # ahead, but no more than the depth (+1 in hand)
    items.close()                        # the caller stops early: the source is closed, the thread gone
    assert closed == [True] and _reader_threads() == 0
    assert len(produced) < 100


def test_read_ahead_keeps_order_and_raises_the_source_error_where_it_happened():
    produced, closed = [], []
    got = []
    with pytest.raises(ConnectionResetError):
        for item in read_ahead(_counting(10, produced, closed, fail_at=6), 2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4, 5] and closed == [True] and _reader_threads() == 0
    assert list(read_ahead(_counting(50, [], []), 3)) == list(range(50))


def test_uid_listing_is_read_in_pages(study, monkeypatch):
    """A study longer than a page of the up-front listing: every page is asked for (limit/offset),
    so the UIDs of the last instances are known too."""
    from urllib.parse import parse_qs, urlsplit

    from omi_dsf.deid import dicomweb_io
    blobs, first = study
    rows = json.loads(_listing(blobs))
    asked = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            query = parse_qs(urlsplit(self.path).query)
            limit, offset = int(query["limit"][0]), int(query.get("offset", ["0"])[0])
            asked.append((limit, offset))
            body = json.dumps(rows[offset:offset + limit]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    monkeypatch.setattr(dicomweb_io, "LIST_PAGE", 2)
    with serve(H) as url:
        found = WadoStudySource(DicomwebClient(Peer(url, timeout=10)), str(first.StudyInstanceUID)).uids()
    assert asked == [(2, 0), (2, 2)]
    sops = {str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(b), stop_before_pixels=True).SOPInstanceUID)
            for b in blobs}
    assert sops <= found and str(first.StudyInstanceUID) in found
