"""DICOMweb transfers of the `infer` step: one series in by WADO-RS, result objects out by STOW-RS.

WADO-RS: the multipart answer is parsed part by part as it streams in, so decoding overlaps the
gateway's sending instead of following it. Instances are asked for with transfer-syntax=* (as
stored): a gateway then need not parse each instance to see whether it must convert it, and the
volume check decides what it can decode.
STOW-RS: instances go as the Part 10 bytes they already are (a prepared SEG is never re-encoded).
"""

from __future__ import annotations

import re
import secrets
from io import BytesIO

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 1 << 20


class MultipartError(ValueError):
    """The answer is not the multipart/related body it claims to be."""


def boundary_of(content_type: str) -> bytes:
    found = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, re.IGNORECASE)
    if not found:
        raise MultipartError(f"Content-Type has no multipart boundary: {content_type[:80]!r}")
    return (found.group(1) or found.group(2)).encode("ascii")


class MultipartParser:
    """Incremental multipart/related (RFC 2046) parser: `feed` bytes, get the bodies completed so far."""

    def __init__(self, boundary: bytes):
        self.delimiter = b"\r\n--" + boundary
        self.buf = bytearray(b"\r\n")  # the first delimiter need not follow a line break
        self.scan = 0                  # where to look for the next delimiter (earlier bytes hold none)
        self.in_part = False           # buf starts with a part's body
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        bodies = []
        while not self.done:
            i = self.buf.find(self.delimiter, self.scan)
            if i < 0:
                self.scan = max(self.scan, len(self.buf) - len(self.delimiter) + 1)
                break
            after = i + len(self.delimiter)
            if len(self.buf) < after + 2:
                self.scan = i
                break
            if self.in_part:
                with memoryview(self.buf) as view:
                    bodies.append(bytes(view[:i]))
            if self.buf[after:after + 2] == b"--":
                self.done, self.in_part = True, False
                break
            headers_end = self.buf.find(b"\r\n\r\n", after)
            if headers_end < 0:  # the next part's headers are still coming: keep from its delimiter on
                del self.buf[:i]
                self.scan, self.in_part = 0, False
                break
            del self.buf[:headers_end + 4]  # cheap: CPython moves a bytearray's start, no copy
            self.in_part, self.scan = True, 0
        return bodies

    def close(self) -> None:
        if not self.done:
            raise MultipartError("multipart body ends before its closing delimiter")


def retrieve_series(session: requests.Session, base_url: str, study_uid: str, series_uid: str,
                    timeout: float) -> list[Dataset]:
    """All instances of a series, as stored at the gateway."""
    url = f"{base_url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"
    with session.get(url, headers={"Accept": ACCEPT}, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        parser = MultipartParser(boundary_of(response.headers.get("Content-Type", "")))
        datasets = []
        for chunk in response.iter_content(CHUNK):
            datasets.extend(dcmread(BytesIO(body)) for body in parser.feed(chunk))
        parser.close()
    return datasets


class StoreFailed(RuntimeError):
    """The gateway did not store every instance (HTTP 202: some failed); transient, retried."""


def store_instances(session: requests.Session, base_url: str, instances: list[bytes], timeout: float) -> None:
    """STOW-RS of Part 10 instances in one request; raises unless the gateway stored them all."""
    boundary = secrets.token_hex(16)
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    body = b"".join(part for blob in instances for part in (head, blob, b"\r\n")) + f"--{boundary}--\r\n".encode()
    response = session.post(f"{base_url.rstrip('/')}/studies", data=body, timeout=timeout, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    response.raise_for_status()
    if response.status_code != 200:
        # the answer names the failed instances by UID; the status alone is enough for the Task
        raise StoreFailed(f"the gateway stored only some of the {len(instances)} result objects "
                          f"(STOW-RS HTTP {response.status_code})")
