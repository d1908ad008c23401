"""DICOMweb as an instance source (WADO-RS, one instance at a time) and sink (STOW-RS, batched).

Source config: {"kind": "dicomweb", "url": DICOMweb base (else the site's gateway_url),
"verify", "cert", "key", "token_file"}. The gateway streams the study as multipart; instances
are handed on as they arrive, as their Part 10 bytes (the pipeline parses each once), so no
study is held in memory whole.
Sink config: the same keys; instances go to POST {url}/studies in batches. STOW-RS is not
transactional: when a later instance fails the leak check, instances already stored stay
(each of them passed the check); the batch not yet sent is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import requests
from pydicom.dataset import Dataset

from omi_dsf.dicomweb.errors import BadRequest
from omi_dsf.dicomweb.multipart import Truncated, dicom_body, iter_bodies

from .instance_io import SinkError, SourceError, register_sink, register_source

_BATCH_BYTES = 32 << 20
_BATCH_COUNT = 64


def _session(config: Mapping[str, Any]) -> requests.Session:
    s = requests.Session()
    s.verify = config.get("verify", True)
    if s.verify is not True:
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override session.verify: not here
        s.trust_env = False
    if config.get("cert"):
        s.cert = (config["cert"], config["key"]) if config.get("key") else config["cert"]
    if config.get("token_file"):  # a bearer token from a file, never from the configuration itself
        s.headers["Authorization"] = "Bearer " + Path(config["token_file"]).read_text().strip()
    return s


def _base(config: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    url = config.get("url") or params.get("gateway_url")
    if not url:
        raise SourceError("DICOMweb source/sink needs 'url' (or the site's gateway_url)")
    return str(url).format(**params).rstrip("/")


class WadoTruncated(requests.ConnectionError):
    """The WADO-RS answer ended before its closing boundary: transient, the worker retries."""


_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
_CHUNK = 1 << 20


class WadoStudySource:
    """WADO-RS of a study, parsed part by part as it streams in (the gateway's own reader)."""

    def __init__(self, url: str, study_uid: str, session: requests.Session, timeout: float = 60):
        self.url = f"{url}/studies/{study_uid}"
        self.session = session
        self.timeout = timeout

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        with self.session.get(self.url, headers={"Accept": _ACCEPT}, stream=True,
                              timeout=self.timeout) as resp:
            status = resp.status_code
            if status == 204:
                return  # no instances: the step says so
            if 400 <= status < 500:
                raise SourceError(f"WADO-RS retrieve of the study failed: HTTP {status}")
            resp.raise_for_status()  # 5xx: the gateway may recover, let the worker retry
            n = 0
            bodies = iter_bodies(resp.headers.get("Content-Type", ""), resp.iter_content(_CHUNK))
            try:
                for n, body in enumerate(bodies, 1):
                    yield f"WADO-RS instance {n}", body
            except Truncated:
                raise WadoTruncated(f"WADO-RS answer ended after {n} instances") from None
            except BadRequest as exc:
                raise SourceError(f"WADO-RS {exc.message}") from None


class StowSink:
    def __init__(self, url: str, session: requests.Session, timeout: float = 120):
        self.url = url + "/studies"
        self.session = session
        self.timeout = timeout
        self._batch: list[bytes] = []
        self._size = 0
        self.stored = 0

    def write(self, ds: Dataset, data: bytes | None = None) -> int:
        if data is None:
            import io
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        self._batch.append(data)
        self._size += len(data)
        if self._size >= _BATCH_BYTES or len(self._batch) >= _BATCH_COUNT:
            self._flush()
        return len(data)

    def _flush(self) -> None:
        if not self._batch:
            return
        body, ctype = dicom_body(self._batch)
        headers = {"Content-Type": ctype, "Accept": "application/dicom+json"}
        resp = self.session.post(self.url, data=body, headers=headers, timeout=self.timeout)
        if 400 <= resp.status_code < 500 or resp.status_code == 409:
            raise SinkError(f"STOW-RS refused the instances: HTTP {resp.status_code}")
        resp.raise_for_status()  # 5xx: transient
        self.stored += len(self._batch)
        self._batch, self._size = [], 0

    def close(self) -> str:
        self._flush()
        return self.url

    def abort(self) -> None:
        self._batch, self._size = [], 0


def _source(config: Mapping[str, Any], params: Mapping[str, Any]) -> WadoStudySource:
    return WadoStudySource(_base(config, params), params["study_uid"], _session(config),
                           float(config.get("timeout", 60)))


def _sink(config: Mapping[str, Any], params: Mapping[str, Any]) -> StowSink:
    return StowSink(_base(config, params), _session(config), float(config.get("timeout", 120)))


register_source("dicomweb", _source)
register_sink("dicomweb", _sink)
