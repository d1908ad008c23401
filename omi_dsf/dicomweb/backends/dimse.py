"""A legacy PACS reached over DIMSE: C-FIND, C-GET / C-MOVE, C-STORE (Study Root)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from ..attributes import (COMPUTED, INSTANCE, INSTANCE_AVAILABILITY, MODALITIES_IN_STUDY, MODALITY,
                          N_SERIES_INSTANCES, N_STUDY_INSTANCES, N_STUDY_SERIES, QR_LEVEL, RETRIEVE_URL, SERIES,
                          SERIES_UID, SOP_UID, STUDY, STUDY_UID, UID_KEYWORD, vr_of)
from ..config import DimseBackendConfig, GatewayConfig
from ..dimse.connection import AssociationPool, Peer, next_message_id
from ..dimse.contexts import RETRY_FAMILIES, find_proposals, get_proposals, move_proposals, retry_proposals
from ..dimse.find import c_find
from ..dimse.move_scp import MoveScp
from ..dimse.retrieve import c_get, c_move
from ..dimse.store import c_store
from ..errors import NotFound, PacsTimeout, PacsUnavailable
from ..slots import ChangeMark, Slots, SlotsBusy
from ..query import WILDCARD_VRS, split_uid_list
from ..stream import CancelToken

log = logging.getLogger(__name__)


_WILDCARD_RUN = re.compile(r"[*?]+")
MAX_PACS_STARS = 2
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"   # (7FE0,0010), Little Endian
# Keys the gateway never takes from the instances' headers: computed, or not in a header.
NOT_IN_HEADERS = {RETRIEVE_URL, INSTANCE_AVAILABILITY, 0x00080052, *COMPUTED[STUDY], *COMPUTED[SERIES]}
HEADER_STUDIES = 16          # studies whose headers are kept (per backend)
HEADER_FETCHES = 10          # studies one completion may fetch headers of


def header_part(data: bytes) -> tuple[bytes, bool]:
    """A received instance cut before its (last) Pixel Data tag: the header to parse later, and
    whether it had pixel data. The last occurrence is at or after the real Pixel Data element, so
    the cut never loses header."""
    cut = data.rfind(PIXEL_DATA_TAG)
    return (data[:cut], True) if cut > 0 else (data, False)


def pacs_pattern(value: str, vr: str) -> str | None:
    """The match value to send a PACS for a wildcard value (None: ask for the attribute
    without matching). Runs of ``*`` and ``?`` become ``?…?*`` (the same set of strings), and a
    pattern that still has more than MAX_PACS_STARS ``*`` is cut to its literal start and ``*``:
    a PACS that matches by backtracking (dcmqrscp took 22.8 s for ``*a*a*a*a*a*a*a*b``) gets
    nothing expensive, and the gateway re-matches every answer itself in linear time."""
    out = []
    for alt in value.split("\\") if vr == "CS" else [value]:
        alt = _WILDCARD_RUN.sub(lambda m: "?" * m.group().count("?") + ("*" if "*" in m.group() else ""), alt)
        if alt.count("*") > MAX_PACS_STARS:
            start = _WILDCARD_RUN.split(alt, 1)[0]
            if not start:
                return None
            alt = start + "*"
        out.append(alt)
    return "\\".join(out)


class MoveScpHolder:
    """Starts the gateway's C-MOVE storage SCP the first time a backend needs it."""

    def __init__(self, cfg: GatewayConfig):
        self._dest = cfg.move_destination
        self._scp = None
        self._lock = threading.Lock()

    def get(self) -> MoveScp:
        """The running SCP."""
        with self._lock:
            if self._scp is None:
                if self._dest is None:
                    raise PacsUnavailable("C-MOVE needs dimse.move_destination in the configuration")
                d = self._dest
                try:
                    self._scp = MoveScp(d.aet, d.bind or d.host, d.port).start()
                except OSError as exc:
                    raise PacsUnavailable(f"cannot listen for C-MOVE on port {d.port}: {exc}") from None
            return self._scp

    def stop(self) -> None:
        with self._lock:
            if self._scp is not None:
                self._scp.stop()
                self._scp = None


class _InstanceCache:
    def __init__(self, max_bytes: int):
        self.max = max_bytes
        self.size = 0
        self.items: OrderedDict[str, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self.lock:
            data = self.items.get(key)
            if data is not None:
                self.items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max:
            return
        with self.lock:
            old = self.items.pop(key, None)
            if old is not None:
                self.size -= len(old)
            self.items[key] = data
            self.size += len(data)
            while self.size > self.max:
                _, dropped = self.items.popitem(last=False)
                self.size -= len(dropped)

    def drop_study(self, keys_prefix: str) -> None:
        with self.lock:
            for k in [k for k in self.items if k.startswith(keys_prefix)]:
                self.size -= len(self.items.pop(k))


class DimseBackend:
    trusts_matching = True   # the PACS already matched; an attribute it left out is not a mismatch

    @property
    def compute_missing(self) -> bool:
        return self.cfg.compute_missing

    def __init__(self, cfg: DimseBackendConfig, calling_aet: str, move: MoveScpHolder, shared=None):
        self.cfg = cfg
        self.name = cfg.name
        self.calling_aet = calling_aet
        self.peer = Peer(cfg.called_aet, cfg.host, cfg.port, cfg.connect_timeout, cfg.acse_timeout,
                         cfg.dimse_timeout, cfg.network_timeout, cfg.max_pdu)
        # ``shared``: the folder of the gateway's worker processes (several workers): the slots are
        # counted across them, and a STOW-RS through one drops the caches of all. Idle pooled
        # associations hold slots too: at most max_associations are open to the PACS at any time.
        self._slots = Slots(cfg.max_associations, shared and shared / "slots" / self.name)
        self._stowed = ChangeMark(shared and shared / f"{self.name}.stow")
        self._find_pool = AssociationPool(calling_aet, self.peer, find_proposals(), "Study Root C-FIND",
                                          size=cfg.pool_size, slots=self._slots)
        self._move_pool = AssociationPool(calling_aet, self.peer, move_proposals(), "Study Root C-MOVE",
                                          size=cfg.pool_size, slots=self._slots)
        self._move = move
        self._summaries: dict[tuple, tuple[float, object]] = {}
        self._summary_lock = threading.Lock()
        self._cache = _InstanceCache(cfg.cache_mb * 1024 * 1024)
        # study UID → (when fetched, its instance headers, their metadata as rendered per request kind)
        self._headers: OrderedDict[str, tuple[float, list[Dataset], dict]] = OrderedDict()
        self._headers_lock = threading.Lock()

    @contextmanager
    def _slot(self):
        """One of ``max_associations``; waiting longer than a DIMSE timeout is a 504, not a hang."""
        try:
            with self._slots.hold(self.cfg.dimse_timeout):
                yield
        except SlotsBusy:
            raise PacsTimeout(f"all {self.cfg.max_associations} associations to PACS {self.name} are busy") from None

    def _drop_if_stowed_elsewhere(self) -> None:
        """Another worker process stored to this PACS: what this one cached may be stale."""
        if self._stowed.changed():
            self._cache.drop_study("")
            with self._headers_lock:
                self._headers.clear()
            with self._summary_lock:
                self._summaries = {}

    # -- C-FIND --------------------------------------------------------------------------------
    def find(self, level: str, match: dict[int, str], returns: set[int], scope: dict[str, str]) -> list[Dataset]:
        ident = Dataset()
        ident.QueryRetrieveLevel = QR_LEVEL[level]
        for lvl, uid in scope.items():
            setattr(ident, UID_KEYWORD[lvl], uid)
        setattr(ident, UID_KEYWORD[level], "")
        for tag in sorted(returns | set(match)):
            vr = vr_of(tag)
            if vr in ("SQ", "UN") or tag in ident or tag >> 16 & 1:
                continue
            value = match.get(tag)
            if value is not None and vr == "UI":
                value = "\\".join(split_uid_list(value))
            elif value is not None and vr in WILDCARD_VRS:
                value = pacs_pattern(value, vr)
            ident.add_new(tag, vr, value if value is not None else None)
        uid_match = match.get({STUDY: 0x0020000D, SERIES: SERIES_UID, INSTANCE: SOP_UID}[level])
        if uid_match:
            setattr(ident, UID_KEYWORD[level], "\\".join(split_uid_list(uid_match)))
        with self._slot():   # (c_find encodes the identifier first: a bad value is a 400)
            return c_find(self._find_pool, ident, next_message_id())

    def _cached(self, key: tuple, compute):
        self._drop_if_stowed_elsewhere()
        now = time.monotonic()
        with self._summary_lock:
            hit = self._summaries.get(key)
        if hit and now - hit[0] < self.cfg.summary_ttl:
            return hit[1]
        value = compute()
        with self._summary_lock:
            if len(self._summaries) > 10000:
                self._summaries.clear()
            self._summaries[key] = (now, value)
        return value

    def series_count(self, study: str, series: str) -> int:
        return self._cached(("series", study, series), lambda: len({
            str(d.get("SOPInstanceUID", "")) for d in
            self.find(INSTANCE, {}, {SOP_UID}, {STUDY: study, SERIES: series})}))

    def study_summary(self, study: str) -> dict[int, object]:
        def compute():
            series = {}
            for d in self.find(SERIES, {}, {MODALITY, N_SERIES_INSTANCES}, {STUDY: study}):
                uid = str(d.get("SeriesInstanceUID", ""))
                if uid and uid not in series:
                    series[uid] = d
            modalities, total = [], 0
            for uid, d in series.items():
                m = str(d.get("Modality", "") or "")
                if m and m not in modalities:
                    modalities.append(m)
                n = d.get("NumberOfSeriesRelatedInstances")
                total += int(n) if n not in (None, "") else self.series_count(study, uid)
            return {MODALITIES_IN_STUDY: sorted(modalities), N_STUDY_SERIES: len(series),
                    N_STUDY_INSTANCES: total}
        return self._cached(("study", study), compute)

    # -- what the PACS leaves out, from the instances' headers ---------------------------------
    def study_headers(self, study: str) -> list[Dataset]:
        """The headers (no pixel data) of every instance of the study, kept for ``summary_ttl``
        seconds for the last HEADER_STUDIES studies; a STOW-RS of the study drops them. Fetched by
        one C-GET: each instance is cut before its pixel data as it arrives (the C-STORE answer
        goes first) and parsed after the transfer."""
        self._drop_if_stowed_elsewhere()
        now = time.monotonic()
        with self._headers_lock:
            hit = self._headers.get(study)
            if hit and now - hit[0] < self.cfg.summary_ttl:
                self._headers.move_to_end(study)
                return hit[1]
        parts: list[tuple[bytes, bool]] = []
        try:
            self.retrieve(STUDY, {STUDY: study}, lambda data: parts.append(header_part(data)), CancelToken(),
                          head=lambda: b"")
        except NotFound:
            pass
        headers = []
        for part in parts:
            try:
                ds = dcmread(BytesIO(part[0]), stop_before_pixels=True, force=True)
            except Exception:  # noqa: BLE001 - a header pydicom cannot read completes nothing
                log.debug("an instance header from %s could not be parsed", self.name)
                continue
            if part[1]:   # it has pixel data: a stand-in, so that its metadata names a BulkDataURI
                ds.add_new(0x7FE00010, "OW" if ds.get("BitsAllocated", 8) > 8 and not ds.file_meta.get(
                    "TransferSyntaxUID", ExplicitVRLittleEndian).is_compressed else "OB", b"\0\0")
            headers.append(ds)
        with self._headers_lock:
            self._headers[study] = (now, headers, {})
            self._headers.move_to_end(study)
            while len(self._headers) > HEADER_STUDIES:
                self._headers.popitem(last=False)
        return headers

    def metadata(self, level: str, scope: dict[str, str], kind: object, render) -> list[bytes]:
        """WADO-RS metadata of a study, series or instance: ``render(header)`` of each instance
        header, from the per-study cache, each rendering kept with the headers under ``kind`` (the
        request's base URL and media type); NotFound when the PACS has none."""
        found = self.study_headers(scope[STUDY])
        with self._headers_lock:
            entry = self._headers.get(scope[STUDY])
        rendered = entry[2] if entry is not None and entry[1] is found else {}
        if len(rendered) > 4 * len(found):   # at most a few kinds (base URL × JSON/XML) per study
            rendered.clear()
        for lvl, tag in ((SERIES, SERIES_UID), (INSTANCE, SOP_UID)):
            if lvl in scope:
                found = [h for h in found if tag in h and str(h[tag].value) == scope[lvl]]
        if not found:
            raise NotFound(f"no instances for this {level}")
        out = []
        for h in found:
            key = (id(h), kind)
            if key not in rendered:
                rendered[key] = render(h)
            out.append(rendered[key])
        return out

    def complete(self, level: str, records: list[Dataset], keys: set[int],
                 scope: dict[str, str]) -> tuple[set[int], set[int]]:
        """Fill ``keys`` that the PACS left out of ``records`` (absent, as dcmqrscp leaves out the
        keys it does not support) from the instances' headers. Returns the keys now checked on
        every record (an attribute the header lacks stays absent: no match) and those that could
        not be filled (more than HEADER_FETCHES studies to fetch, or the PACS had no instance)."""
        keys = {k for k in keys if k not in NOT_IN_HEADERS and not (k >> 16) & 1 and k >> 16 != 0x0002}
        missing = {k for k in keys for ds in records if k not in ds}
        if not missing:
            return set(), set()
        filled, unfilled = set(), set()
        fetched: dict[str, list[Dataset]] = {}   # study → its headers, once per completion (summary_ttl may be 0)
        by_uid: dict[tuple[str, int], dict[str, Dataset]] = {}   # a study's headers by series/SOP UID
        for ds in records:
            absent = [k for k in missing if k not in ds]
            if not absent:
                continue
            study = scope.get(STUDY) or (str(ds[STUDY_UID].value) if STUDY_UID in ds else "")
            cached = self._headers.get(study)
            if not study or (study not in fetched and len(fetched) >= HEADER_FETCHES and cached is None):
                unfilled.update(absent)
                continue
            headers = fetched.get(study)
            if headers is None:
                headers = fetched[study] = self.study_headers(study)
            if level == STUDY:
                source = headers[0] if headers else None
            else:
                tag = SERIES_UID if level == SERIES else SOP_UID
                want = scope.get(level) or (str(ds[tag].value) if tag in ds else "")
                index = by_uid.get((study, tag))
                if index is None:       # once per study, not a scan of its headers per record
                    index = by_uid[(study, tag)] = {}
                    for h in headers:
                        if tag in h:
                            index.setdefault(str(h[tag].value), h)
                source = index.get(want)
            if source is None:
                unfilled.update(absent)
                continue
            for k in absent:
                if k in source:
                    ds[k] = source[k]
            filled.update(absent)
        return filled - unfilled, unfilled

    # -- C-GET / C-MOVE ------------------------------------------------------------------------
    def _identifier(self, level: str, scope: dict[str, str]) -> Dataset:
        ident = Dataset()
        ident.QueryRetrieveLevel = QR_LEVEL[level]
        for lvl in (STUDY, SERIES, INSTANCE):
            if lvl in scope:
                setattr(ident, UID_KEYWORD[lvl], scope[lvl])
        return ident

    def retrieve(self, level: str, scope: dict[str, str], emit, token: CancelToken, head=None) -> None:
        with self._slot():
            self._retrieve(level, scope, emit, token, head)

    def _retrieve(self, level: str, scope: dict[str, str], emit, token: CancelToken, head) -> None:
        ident = self._identifier(level, scope)
        mode = self.cfg.retrieve
        framed = emit if head is None else (lambda data: emit(head() + data))
        if mode in ("get", "auto"):
            try:
                self._c_get(ident, emit, token, head)
                return
            except NotFound:
                if mode == "get":
                    raise
                log.info("C-GET found nothing on %s; trying C-MOVE", self.name)
        scp = self._move.get()
        c_move(self._move_pool, scp, scp.aet, ident, framed, token, next_message_id())

    def _c_get(self, ident: Dataset, emit, token: CancelToken, head) -> None:
        """C-GET with uncompressed and lossless contexts; what the PACS could not send that way
        is asked for again, one compressed family at a time (dimse/contexts.py)."""
        seen: set[bytes] = set()
        first = c_get(self.calling_aet, self.peer, ident, emit, token, next_message_id(), head,
                      get_proposals(), seen, check=False)
        total, last = first.suboperations, first
        for family in RETRY_FAMILIES:
            if not first.failed or len(seen) >= total or token.cancelled:
                break
            last = c_get(self.calling_aet, self.peer, ident, emit, token, next_message_id(), head,
                         retry_proposals(family), seen, check=False, optional=True)
        if not seen:
            if first.status == 0xFE00:
                raise PacsUnavailable("C-GET was cancelled by the PACS")
            if first.status not in (0x0000, 0xB000):
                raise PacsUnavailable(f"C-GET: PACS {self.name} answered with failure status 0x{first.status:04X}")
            raise first.error or NotFound("C-GET: the PACS has no instances for this request")
        if len(seen) < total:
            log.warning("C-GET from %s: %d of %d instances could not be retrieved (last status 0x%04X)",
                        self.name, total - len(seen), total, last.status)

    def instance(self, study: str, series: str, sop: str) -> bytes:
        key = f"{study}/{series}/{sop}"
        self._drop_if_stowed_elsewhere()
        data = self._cache.get(key)
        if data is not None:
            return data
        got: list[bytes] = []
        self.retrieve(INSTANCE, {STUDY: study, SERIES: series, INSTANCE: sop}, got.append, CancelToken())
        data = got[0]
        self._cache.put(key, data)
        return data

    # -- C-STORE -------------------------------------------------------------------------------
    def store(self, items: list[tuple[str, str, str, bytes]], study_uids: set[str],
              headers=None) -> list[tuple[int, str]]:  # headers: parsed by the store backend only
        with self._slot():
            results = c_store(self.calling_aet, self.peer, items)
        self._stowed.touch()
        for study in study_uids:
            self._cache.drop_study(study + "/")
        with self._headers_lock:
            for study in study_uids:
                self._headers.pop(study, None)
        with self._summary_lock:
            self._summaries = {k: v for k, v in self._summaries.items() if k[1] not in study_uids}
        return results

    def close(self) -> None:
        for pool in (self._find_pool, self._move_pool):
            pool.close()
