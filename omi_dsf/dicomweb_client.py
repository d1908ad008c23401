"""The one DICOMweb client of omi_dsf: QIDO-RS, WADO-RS and STOW-RS against a gateway (ours or
another), over an httpx client that `omi_dsf.peer.Peer` opens. One method per transaction, named
as dicomweb-client names them (search_for_series, retrieve_series, store_instances, …).

Why not dicomweb-client itself: its session is requests', which would be a second HTTP library
and a second way to configure TLS; and its retrieve parses whole answers, where the callers here
read WADO-RS part by part as it streams in (multipart.iter_bodies, the gateway's own measured
reader).

One error mapping, for every transaction:
  no answer, TLS                 PeerUnreachable (retryable) / PeerTlsError (omi_dsf.peer)
  HTTP 5xx, 429                  DicomwebBusy (retryable)
  other HTTP 4xx                 DicomwebRefused, with .status (401/403/404/409/413 … for the caller
                                 to word); a STOW-RS 409 or 202 is an answer, not an error
  answer cut off                 AnswerTruncated (retryable)
  answer not what it claims      BadAnswer
A QIDO-RS 204 (or an empty 200) is an empty list.

A WADO-RS retrieve can read ahead (`ahead=N`): a thread reads the answer and splits it into parts
while the caller works on the ones before, at most N parts ahead, so the gateway's sending, the
reading and the caller's work (de-identification, decoding) overlap instead of taking turns.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence, TypeVar

import httpx

from omi_dsf.dicomweb.errors import BadRequest
from omi_dsf.dicomweb.multipart import Truncated, dicom_pieces, iter_bodies
from omi_dsf.errors import RetryableError
from omi_dsf.peer import Peer

DICOM_JSON = "application/dicom+json"
STOW_ANSWERS = (200, 202, 409)


class DicomwebError(Exception):
    """A DICOMweb transaction failed; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None, reason: str = ""):
        super().__init__(message)
        self.status = status
        self.reason = reason    # the gateway's own words ({"error": …} of an OMI gateway), if any


class DicomwebBusy(DicomwebError, RetryableError):
    """The gateway answered 5xx or 429: transient."""


class DicomwebRefused(DicomwebError):
    """The gateway refused the request (HTTP 4xx); whether that is final is the caller's call."""


class BadAnswer(DicomwebError):
    """The answer is not the DICOM JSON or multipart/related body it should be."""


class AnswerTruncated(BadAnswer, ConnectionError, RetryableError):
    """A multipart answer ended inside a part: transient."""


def check_status(resp: httpx.Response, what: str, ok: Iterable[int] = (200,)) -> None:
    """The one mapping of HTTP statuses to errors."""
    status = resp.status_code
    if status in ok:
        return
    if status >= 500 or status == 429:
        raise DicomwebBusy(f"{what}: HTTP {status}", status, _reason(resp))
    if status >= 400:
        raise DicomwebRefused(f"{what}: HTTP {status}", status, _reason(resp))
    raise BadAnswer(f"{what}: unexpected HTTP {status}", status)


def _reason(resp: httpx.Response) -> str:
    try:
        resp.read()
        return str(resp.json().get("error", ""))[:200]
    except (ValueError, AttributeError, httpx.HTTPError):
        return ""


@dataclass
class StowAnswer:
    status: int                                    # 200 all stored, 202 some failed or warnings, 409 none
    answer: dict = field(default_factory=dict)     # the DICOM JSON answer (00081199, 00081198, …)


T = TypeVar("T")
_END = object()


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """`items` as a background thread produces them, at most `depth` ahead of the caller. An error
    of `items` is raised to the caller where its item would have come; when the caller stops early
    (an error of its own, or it has enough), the thread stops after the item it is reading and
    closes `items` (for a WADO-RS answer: the HTTP stream)."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, _END))
        except BaseException as exc:  # handed to the caller, raised there
            put((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="omi-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = slots.get()
            if ok:
                yield item
            elif item is _END:
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()


def _fields(fields: Sequence[str] | None, search_filters: Mapping[str, Any] | None, limit: int | None,
            offset: int | None, include_defaults: bool = True) -> list[tuple[str, str]]:
    """QIDO-RS query parameters. ``include_defaults=False`` asks for ``fields`` (and the UIDs
    placing each match) without the PS3.18 default return keys: ``includedefaults=false``, as
    dcm4chee-arc and the OMI gateway know it; a server that does not ignores it (PS3.18 8.3) and
    answers the defaults too."""
    params = [(str(k), str(v)) for k, v in (search_filters or {}).items()]
    params += [("includefield", str(f)) for f in fields or ()]
    if not include_defaults:
        params.append(("includedefaults", "false"))
    if limit is not None:
        params.append(("limit", str(limit)))
    if offset is not None:
        params.append(("offset", str(offset)))
    return params


def accept_dicom(transfer_syntax: str | None = "*") -> str:
    ts = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
    return f'multipart/related; type="application/dicom"{ts}'


class DicomwebClient:
    """DICOMweb at `peer` (its URL is the service root: …/studies follows it). `http` replaces the
    HTTP client (e.g. a starlette TestClient); then `url` is the service root on it."""

    def __init__(self, peer: Peer | None = None, *, http: httpx.Client | None = None, url: str | None = None):
        if peer is None and http is None:
            raise ValueError("DicomwebClient needs a peer or an http client")
        self.peer = peer
        self.url = (url if url is not None else peer.url if peer else "").rstrip("/")
        self._own = http is None
        self._http = http if http is not None else peer.client(base_url=False)

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> "DicomwebClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the exchange --------------------------------------------------------------------------

    def _errors(self, what: str):
        if self.peer is not None:
            return self.peer.errors(what)
        return Peer(self.url or "http://local", where="gateway").errors(what)

    def _get_json(self, path: str, params: list[tuple[str, str]], what: str) -> list[dict]:
        with self._errors(what):
            resp = self._http.get(self.url + path, params=params, headers={"Accept": DICOM_JSON})
        if resp.status_code == 204 or (resp.status_code == 200 and not resp.content):
            return []
        check_status(resp, what)
        try:
            found = resp.json()
        except ValueError:
            raise BadAnswer(f"{what}: the answer is not JSON", resp.status_code) from None
        if not isinstance(found, list) or not all(isinstance(i, dict) for i in found):
            raise BadAnswer(f"{what}: the answer is not a DICOM JSON list", resp.status_code)
        return found

    # -- QIDO-RS ---------------------------------------------------------------------------------

    def search_for_studies(self, fields: Sequence[str] | None = None, search_filters: Mapping[str, Any] | None = None,
                           limit: int | None = None, offset: int | None = None, *,
                           include_defaults: bool = True) -> list[dict]:
        return self._get_json("/studies", _fields(fields, search_filters, limit, offset, include_defaults),
                              "QIDO-RS search of studies")

    def search_for_series(self, study_instance_uid: str | None = None, fields: Sequence[str] | None = None,
                          search_filters: Mapping[str, Any] | None = None, limit: int | None = None,
                          offset: int | None = None, *, include_defaults: bool = True) -> list[dict]:
        path = f"/studies/{study_instance_uid}/series" if study_instance_uid else "/series"
        return self._get_json(path, _fields(fields, search_filters, limit, offset, include_defaults),
                              "QIDO-RS search of series")

    def search_for_instances(self, study_instance_uid: str | None = None, series_instance_uid: str | None = None,
                             fields: Sequence[str] | None = None, search_filters: Mapping[str, Any] | None = None,
                             limit: int | None = None, offset: int | None = None, *,
                             include_defaults: bool = True) -> list[dict]:
        path = ""
        if study_instance_uid:
            path = f"/studies/{study_instance_uid}"
            if series_instance_uid:
                path += f"/series/{series_instance_uid}"
        return self._get_json(path + "/instances", _fields(fields, search_filters, limit, offset, include_defaults),
                              "QIDO-RS search of instances")

    # -- WADO-RS ---------------------------------------------------------------------------------

    def iter_study(self, study_instance_uid: str, transfer_syntax: str | None = "*", *,
                   ahead: int = 0) -> Iterator[bytes]:
        """The study's instances (Part 10 bytes) as they stream in; none for a 204. With `ahead`,
        read by a thread up to that many instances ahead of the caller (read_ahead)."""
        found = self._iter(f"/studies/{study_instance_uid}", transfer_syntax, "WADO-RS retrieve of the study")
        return read_ahead(found, ahead) if ahead > 0 else found

    def iter_series(self, study_instance_uid: str, series_instance_uid: str,
                    transfer_syntax: str | None = "*", *, ahead: int = 0) -> Iterator[bytes]:
        found = self._iter(f"/studies/{study_instance_uid}/series/{series_instance_uid}", transfer_syntax,
                           "WADO-RS retrieve of a series")
        return read_ahead(found, ahead) if ahead > 0 else found

    def retrieve_study(self, study_instance_uid: str, transfer_syntax: str | None = "*") -> list[bytes]:
        return list(self.iter_study(study_instance_uid, transfer_syntax))

    def retrieve_series(self, study_instance_uid: str, series_instance_uid: str,
                        transfer_syntax: str | None = "*") -> list[bytes]:
        return list(self.iter_series(study_instance_uid, series_instance_uid, transfer_syntax))

    def retrieve_instance(self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str,
                          transfer_syntax: str | None = "*") -> bytes:
        path = f"/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}"
        found = list(self._iter(path, transfer_syntax, "WADO-RS retrieve of an instance"))
        if len(found) != 1:
            raise BadAnswer(f"WADO-RS retrieve of an instance: {len(found)} parts in the answer")
        return found[0]

    def retrieve_study_metadata(self, study_instance_uid: str) -> list[dict]:
        return self._get_json(f"/studies/{study_instance_uid}/metadata", [], "WADO-RS metadata of the study")

    def retrieve_series_metadata(self, study_instance_uid: str, series_instance_uid: str) -> list[dict]:
        return self._get_json(f"/studies/{study_instance_uid}/series/{series_instance_uid}/metadata", [],
                              "WADO-RS metadata of a series")

    def _iter(self, path: str, transfer_syntax: str | None, what: str) -> Iterator[bytes]:
        n = 0
        with self._errors(what):
            with self._http.stream("GET", self.url + path, headers={"Accept": accept_dicom(transfer_syntax)}) as resp:
                if resp.status_code == 204:
                    return
                check_status(resp, what)
                # as httpx reads them (64 KB): re-chunking into 1 MB pieces measured slower
                try:
                    for body in iter_bodies(resp.headers.get("Content-Type", ""), resp.iter_bytes()):
                        n += 1
                        yield body
                except Truncated:
                    raise AnswerTruncated(f"{what}: the answer ended after {n} instances") from None
                except BadRequest as exc:   # the gateway's own parser: here it is the answer that is broken
                    raise BadAnswer(f"{what}: {exc.message}") from None

    # -- STOW-RS ---------------------------------------------------------------------------------

    def store_instances(self, instances: Sequence[bytes], study_instance_uid: str | None = None) -> StowAnswer:
        """STOW-RS of Part 10 instances. The answer for 200, 202 and 409 (the caller reads which
        instances failed and why); any other status raises."""
        path = f"/studies/{study_instance_uid}" if study_instance_uid else "/studies"
        headers = {"Accept": DICOM_JSON}
        pieces, headers["Content-Type"] = dicom_pieces(instances)
        headers["Content-Length"] = str(sum(len(p) for p in pieces))   # sent as it is, not chunked
        with self._errors("STOW-RS"):
            resp = self._http.post(self.url + path, content=pieces, headers=headers)
        check_status(resp, "STOW-RS", STOW_ANSWERS)
        try:
            answer = resp.json() if resp.content else {}
        except ValueError:
            answer = {}
        return StowAnswer(resp.status_code, answer if isinstance(answer, dict) else {})
