"""C-GET and C-MOVE (Study Root) that hand each received instance to ``emit`` as it arrives.

C-GET: the instances come back on the same association as C-STORE sub-operations.
C-MOVE: the PACS opens its own association to the gateway's storage SCP (:class:`MoveScp`); the
sub-operations carry the Move Originator Message ID, which routes them to the waiting request.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)
from pynetdicom import StoragePresentationContexts

from ..errors import DicomwebError, NotFound, PacsTimeout, PacsUnavailable
from ..stream import CancelToken, Cancelled
from .association import (STORAGE_SYNTAXES, AssociationPool, abort, busy, next_message_id,
                          set_nodelay_busy)
from .find import lost

log = logging.getLogger(__name__)

Emit = Callable[[bytes], None]
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


@dataclass
class RetrieveSummary:
    received: int = 0
    error: DicomwebError | None = None   # why our side refused an instance (e.g. cannot convert)
    completed: int = 0
    failed: int = 0
    warning: int = 0


def _sink(emit: Emit, summary: RetrieveSummary, token: CancelToken) -> Callable:
    def handle(event) -> int:
        if token.cancelled:
            return OUT_OF_RESOURCES  # refuse what still comes after the client left
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001
            log.warning("could not encode a received instance")
            return CANNOT_UNDERSTAND
        try:
            emit(data)
        except Cancelled:
            return OUT_OF_RESOURCES
        except DicomwebError as exc:
            summary.error = summary.error or exc
            return CANNOT_UNDERSTAND
        summary.received += 1
        return 0x0000
    return handle


def dispatch_store(event) -> int:
    """EVT_C_STORE handler bound on C-GET associations: forwards to the current request's sink."""
    sink = getattr(event.assoc, "omi_sink", None)
    if sink is None:
        return OUT_OF_RESOURCES
    return sink(event)


def _final(op: str, pool: AssociationPool, code: int, status: Dataset, summary: RetrieveSummary) -> None:
    summary.completed = int(getattr(status, "NumberOfCompletedSuboperations", summary.received) or 0)
    summary.failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
    summary.warning = int(getattr(status, "NumberOfWarningSuboperations", 0) or 0)
    if code in (0x0000, 0xB000):
        return
    if code == 0xFE00:
        raise PacsUnavailable(f"{op} was cancelled by the PACS")
    if code == 0xA801:
        raise PacsUnavailable(f"{op}: the PACS does not know the move destination "
                              f"(add the gateway's AE title to its configuration)")
    raise PacsUnavailable(f"{op}: PACS {pool.peer.aet} answered with failure status 0x{code:04X}")


def _run(op: str, pool: AssociationPool, responses_fn, summary: RetrieveSummary, token: CancelToken,
         assoc, msg_id: int, query_model: str) -> RetrieveSummary:
    """Drive the C-GET/C-MOVE responses. When the consumer is gone (``token``), send C-CANCEL at
    the next pending response and release the association instead of pooling it; abort only when
    the PACS stops answering (then pynetdicom's DIMSE timeout ends the wait)."""
    started = time.monotonic()
    ok = False
    try:
        with busy(assoc):
            _consume(op, pool, responses_fn(), summary, token, assoc, msg_id, query_model, started)
        ok = True
    except _CancelledAfterFinal:
        ok = True
        raise
    except (RuntimeError, OSError, ValueError) as exc:
        ok = False
        if token.cancelled:
            raise Cancelled() from None
        raise PacsUnavailable(f"{op}: {exc}") from None
    except (PacsUnavailable, PacsTimeout):
        ok = assoc.is_established and not isinstance(sys.exc_info()[1], PacsTimeout)
        raise
    finally:
        if not ok:
            abort(assoc)
        pool.release(assoc, reusable=ok and not token.cancelled)
    if summary.received == 0:
        raise summary.error or NotFound(f"{op}: the PACS has no instances for this request")
    return summary


def _consume(op, pool, responses, summary, token, assoc, msg_id, query_model, started) -> None:
    cancel_sent = False
    for status, _ident in responses:
        code = getattr(status, "Status", None)
        if code is None:
            if token.cancelled:
                raise Cancelled()
            raise lost(op, pool, started)
        if code in (0xFF00, 0xFF01):
            if token.cancelled and not cancel_sent:
                cancel_sent = True
                assoc.send_c_cancel(msg_id, query_model=query_model)
            continue
        if token.cancelled:
            raise _CancelledAfterFinal()
        _final(op, pool, code, status, summary)
        return
    if token.cancelled:
        raise Cancelled()
    raise lost(op, pool, started)


class _CancelledAfterFinal(Cancelled):
    """Cancelled, but the PACS finished the operation: the association is clean."""


def c_get(pool: AssociationPool, identifier: Dataset, emit: Emit, token: CancelToken) -> RetrieveSummary:
    summary = RetrieveSummary()
    for attempt in (1, 2):
        assoc, reused = pool.acquire()
        assoc.omi_sink = _sink(emit, summary, token)
        msg_id = next_message_id()
        model = StudyRootQueryRetrieveInformationModelGet
        try:
            return _run("C-GET", pool, lambda: assoc.send_c_get(identifier, model, msg_id=msg_id),
                        summary, token, assoc, msg_id, model)
        except PacsUnavailable:
            if attempt == 1 and reused and summary.received == 0 and not token.cancelled:
                continue  # a pooled association the PACS had dropped
            raise
        finally:
            assoc.omi_sink = None
    raise AssertionError("unreachable")


class MoveRoutes:
    """Which pending C-MOVE an incoming C-STORE belongs to: the one whose Message ID it carries
    (Move Originator Message ID); for a PACS that leaves that out, the only pending one."""

    def __init__(self) -> None:
        self._sinks: dict[int, tuple[Callable, str | None]] = {}
        self._lock = threading.Lock()

    def register(self, msg_id: int, sink: Callable, study_uid: str | None) -> None:
        with self._lock:
            self._sinks[msg_id] = (sink, study_uid)

    def unregister(self, msg_id: int) -> None:
        with self._lock:
            self._sinks.pop(msg_id, None)

    def route(self, msg_id: int | None) -> tuple[tuple[Callable, str | None] | None, list]:
        """(sink, study UID) of the move, or None and every pending move to choose from."""
        with self._lock:
            entry = self._sinks.get(msg_id) if msg_id is not None else None
            if entry is None and len(self._sinks) == 1:
                entry = next(iter(self._sinks.values()))
            return entry, (list(self._sinks.values()) if entry is None else [])


class MoveScp(MoveRoutes):
    """The gateway's storage SCP: the destination of its own C-MOVE requests."""

    def __init__(self, aet: str, bind: str, port: int):
        super().__init__()
        self.aet, self.bind, self.port = aet, bind, port
        self._server = None

    def start(self) -> "MoveScp":
        ae = AE(ae_title=self.aet)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, STORAGE_SYNTAXES)
        ae.maximum_pdu_size = 0
        self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=[
            (evt.EVT_CONN_OPEN, set_nodelay_busy), (evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event) -> int:
        entry, candidates = self.route(getattr(event.request, "MoveOriginatorMessageID", None))
        if entry is None and candidates:
            try:
                study = event.dataset.StudyInstanceUID
            except Exception:  # noqa: BLE001
                study = None
            entry = next((c for c in candidates if c[1] == study), None)
        if entry is None:
            log.warning("C-STORE to the move SCP that belongs to no pending C-MOVE; refused")
            return OUT_OF_RESOURCES
        return entry[0](event)


def c_move(pool: AssociationPool, scp: MoveScp, identifier: Dataset, emit: Emit,
           token: CancelToken) -> RetrieveSummary:
    summary = RetrieveSummary()
    assoc, _ = pool.acquire()
    msg_id = next_message_id()
    scp.register(msg_id, _sink(emit, summary, token), getattr(identifier, "StudyInstanceUID", None))
    model = StudyRootQueryRetrieveInformationModelMove
    try:
        return _run("C-MOVE", pool, lambda: assoc.send_c_move(identifier, scp.aet, model, msg_id=msg_id),
                    summary, token, assoc, msg_id, model)
    finally:
        scp.unregister(msg_id)
