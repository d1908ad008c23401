"""DICOMweb as an instance source (WADO-RS, one instance at a time) and sink (STOW-RS, batched).

Source config: {"kind": "dicomweb", "url": DICOMweb base (else the site's gateway_url), and the
peer keys (omi_dsf.peer): "ca_file", "client_cert", "client_key", "token_file", "timeout"; the
deprecated "verify"/"cert"/"key" are translated with a warning}. The gateway streams the study as
multipart; instances are handed on as they arrive, as their Part 10 bytes (the pipeline parses each
once), read by a thread up to READ_AHEAD instances ahead of the de-identification (the gateway,
the reading and the de-identification overlap), so no study is held in memory whole.
Sink config: the same keys; instances go to POST {url}/studies in batches. STOW-RS is not
transactional: when a later instance fails the leak check, instances already stored stay
(each of them passed the check); the batch not yet sent is dropped.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from pydicom.dataset import Dataset

from omi_dsf.dicomweb_client import AnswerTruncated, BadAnswer, DicomwebClient, DicomwebRefused
from omi_dsf.peer import Peer, PeerConfigError, PeerUnreachable

from .instance_io import SinkError, SourceError, register_sink, register_source

_BATCH_BYTES = 32 << 20
_BATCH_COUNT = 64
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
READ_AHEAD = 8          # instances read ahead of the de-identification (~4 MB for CT)


def _client(config, params: Mapping[str, Any], what: str, timeout: float) -> DicomwebClient:
    url = config.url or params.get("gateway_url")
    if not url:
        raise SourceError("DICOMweb source/sink needs 'url' (or the site's gateway_url)")
    try:
        peer = config.peer(str(url).format(**params), f"pseudonymization.{what}", timeout=timeout)
        return DicomwebClient(peer)
    except PeerConfigError as exc:
        raise (SourceError if what == "source" else SinkError)(str(exc)) from None


class WadoTruncated(PeerUnreachable):
    """The WADO-RS answer ended before its closing boundary: transient, the worker retries."""


class WadoStudySource:
    """WADO-RS of a study, parsed part by part as it streams in (the gateway's own reader)."""

    def __init__(self, dicomweb: DicomwebClient, study_uid: str):
        self.dicomweb = dicomweb
        self.study_uid = study_uid
        self.url = f"{dicomweb.url}/studies/{study_uid}"

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        n = 0
        parts = self.dicomweb.iter_study(self.study_uid, _EXPLICIT_LE, ahead=READ_AHEAD)
        try:
            for n, body in enumerate(parts, 1):
                yield f"WADO-RS instance {n}", body
        except DicomwebRefused as exc:
            raise SourceError(f"WADO-RS retrieve of the study failed: HTTP {exc.status}") from None
        except AnswerTruncated:
            raise WadoTruncated(f"WADO-RS answer ended after {n} instances") from None
        except BadAnswer as exc:
            raise SourceError(f"WADO-RS {str(exc).split(': ', 1)[-1]}") from None
        # 5xx (DicomwebBusy) and no answer (PeerUnreachable): the gateway may recover, the worker retries
        finally:
            parts.close()           # the reading thread first, then its connection
            self.dicomweb.close()


class StowSink:
    def __init__(self, dicomweb: DicomwebClient):
        self.dicomweb = dicomweb
        self.url = dicomweb.url + "/studies"
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
        try:
            status = self.dicomweb.store_instances(self._batch).status
        except DicomwebRefused as exc:
            raise SinkError(f"STOW-RS refused the instances: HTTP {exc.status}") from None
        # 5xx (DicomwebBusy) and no answer (PeerUnreachable): transient
        if status == 409:
            raise SinkError("STOW-RS refused the instances: HTTP 409")
        self.stored += len(self._batch)
        self._batch, self._size = [], 0

    def close(self) -> str:
        try:
            self._flush()
        finally:
            self.dicomweb.close()
        return self.url

    def abort(self) -> None:
        self._batch, self._size = [], 0
        self.dicomweb.close()


def _source(config, params: Mapping[str, Any]) -> WadoStudySource:
    return WadoStudySource(_client(config, params, "source", 60), params["study_uid"])


def _sink(config, params: Mapping[str, Any]) -> StowSink:
    return StowSink(_client(config, params, "sink", 120))


register_source("dicomweb", _source)
register_sink("dicomweb", _sink)
