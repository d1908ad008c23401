"""C-GET and C-MOVE (Study Root): each received instance goes to ``emit`` as Part 10 bytes (a file
meta group + the data set exactly as sent) as it arrives.

C-GET: A-ASSOCIATE-RQ (Get context + storage contexts with SCP role) → C-GET-RQ →
{C-STORE-RQ + data → C-STORE-RSP, C-GET-RSP pending}* → C-GET-RSP final → A-RELEASE. When the
client is gone (``token``), the association is aborted at once. With ``head`` (the WADO-RS
multipart part header), each instance is emitted as head + Part 10 in the one buffer the PDV
fragments are joined into anyway, and its C-STORE-RSP goes out before the instance is handed on:
the PACS starts the next sub-operation while the HTTP side wakes up.

C-MOVE: the PACS opens its own association to the gateway's storage SCP (move_scp.MoveScp); the
sub-operations carry the Move Originator Message ID, which routes them to the waiting request
(:class:`MoveRoutes`). When the client is gone, a C-CANCEL goes to the PACS.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pydicom.dataset import Dataset

from ..errors import DicomwebError, NotFound, PacsTimeout, PacsUnavailable
from ..stream import CancelToken, Cancelled
from .connection import AssociationPool, Peer, messages, open_association, release
from .contexts import GET, MOVE, get_proposals
from .messages import (AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE, C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, CANCELLED,
                       CANNOT_UNDERSTAND, COMMAND_FIELD, COMPLETED, FAILED, OUT_OF_RESOURCES, PENDING, STATUS,
                       SUCCESS, WARNING, cancel_rq, encoded, get_rq, move_rq, part10_meta, store_rsp, uid_of,
                       us_of)
from .pdu import Proposal

log = logging.getLogger(__name__)

Emit = Callable[[bytes], None]
Sink = Callable[[bytes], int]      # an instance's Part 10 bytes → the C-STORE status to answer
WARNING_STATUS = 0xB000
MOVE_DESTINATION_UNKNOWN = 0xA801


@dataclass
class RetrieveSummary:
    received: int = 0
    error: DicomwebError | None = None   # why our side refused an instance (e.g. cannot convert)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    status: int = SUCCESS                # the final response's

    @property
    def suboperations(self) -> int:
        return self.completed + self.failed + self.warning


def sink(emit: Emit, summary: RetrieveSummary, token: CancelToken) -> Sink:
    """What to answer a C-STORE sub-operation after handing its instance to ``emit``."""
    def handle(data: bytes) -> int:
        if token.cancelled:
            return OUT_OF_RESOURCES  # refuse what still comes after the client left
        try:
            emit(data)
        except Cancelled:
            return OUT_OF_RESOURCES
        except DicomwebError as exc:
            summary.error = summary.error or exc
            return CANNOT_UNDERSTAND
        summary.received += 1
        return SUCCESS
    return handle


def _counts(cmd: dict[int, bytes], summary: RetrieveSummary) -> None:
    summary.completed = us_of(cmd, COMPLETED, summary.received)
    summary.failed = us_of(cmd, FAILED)
    summary.warning = us_of(cmd, WARNING)


def _final(op: str, peer: Peer, code: int, summary: RetrieveSummary) -> None:
    """Raise for a final status that is a failure with nothing received."""
    if code == CANCELLED:
        raise PacsUnavailable(f"{op} was cancelled by the PACS")
    if code == MOVE_DESTINATION_UNKNOWN:
        raise PacsUnavailable(f"{op}: the PACS does not know the move destination "
                              f"(add the gateway's AE title to its configuration)")
    if code not in (SUCCESS, WARNING_STATUS) and summary.received == 0:
        raise PacsUnavailable(f"{op}: PACS {peer.aet} answered with failure status 0x{code:04X}")


def c_get(calling_aet: str, peer: Peer, identifier: Dataset, emit: Emit, token: CancelToken, msg_id: int,
          head: Callable[[], bytes] | None = None, proposals: tuple[Proposal, ...] | None = None,
          seen: set[bytes] | None = None, check: bool = True, optional: bool = False) -> RetrieveSummary:
    """C-GET ``identifier`` and ``emit`` every instance as it arrives (Part 10 bytes, after
    ``head()`` if given; then ``emit`` may only raise :class:`Cancelled`).

    ``seen``: SOP Instance UIDs already emitted (by an earlier pass); such an instance is answered
    with success and not emitted again, and every emitted one is added. With ``check`` a failure
    status or nothing received raises; without, the summary says what happened. ``optional``: when
    the PACS accepts none of the storage contexts, nothing is asked (an empty summary)."""
    summary = RetrieveSummary()
    seen = set() if seen is None else seen
    started = time.monotonic()
    conn = open_association(calling_aet, peer, proposals or get_proposals(), scp_roles=True,
                            required="Study Root C-GET")
    done = False
    try:
        if len(conn.accepted) < 2 and optional:
            summary.status = SUCCESS
            done = True
            return summary
        conn.send_message(1, get_rq(GET, msg_id), encoded(identifier, conn.accepted[1]))

        def meta(cid: int, cmd: dict[int, bytes]) -> bytes:
            ts = conn.accepted.get(cid)
            if ts is None or us_of(cmd, COMMAND_FIELD) != C_STORE_RQ:
                return b""
            group = part10_meta(uid_of(cmd, AFFECTED_SOP_CLASS), uid_of(cmd, AFFECTED_SOP_INSTANCE), ts)
            return group if head is None else head() + group

        for cid, cmd, data in messages(conn, token, prefix=meta):
            field = us_of(cmd, COMMAND_FIELD)
            if field == C_GET_RSP:
                status = us_of(cmd, STATUS)
                if status in PENDING:
                    continue
                summary.status = status
                _counts(cmd, summary)
                break
            if field != C_STORE_RQ:
                raise PacsUnavailable(f"C-GET: unexpected DIMSE command 0x{field:04X} from PACS {peer.aet}")
            sop = uid_of(cmd, AFFECTED_SOP_INSTANCE)
            status = SUCCESS
            if cid not in conn.accepted or data is None:
                status = CANNOT_UNDERSTAND
            elif sop in seen:
                pass   # sent in an earlier pass
            elif head is not None:
                # Answer first: the PACS waits for this answer before it sends the next instance.
                conn.send_message(cid, store_rsp(cmd, status))
                seen.add(sop)
                emit(data)  # raises Cancelled when the client is gone: the association is aborted
                summary.received += 1
                continue
            else:
                try:
                    emit(data)  # Part 10: meta() put the file meta group in front
                    seen.add(sop)
                    summary.received += 1
                except Cancelled:
                    raise
                except DicomwebError as exc:
                    summary.error = summary.error or exc
                    status = CANNOT_UNDERSTAND
            conn.send_message(cid, store_rsp(cmd, status))
        done = True
    finally:
        if done:
            release(conn)
        else:
            conn.abort()  # also when the client went away: the association goes at once
    log.debug("C-GET: %d instances in %.2f s", summary.received, time.monotonic() - started)
    if check:
        _final("C-GET", peer, summary.status, summary)
        if summary.received == 0:
            raise summary.error or NotFound("C-GET: the PACS has no instances for this request")
    return summary


class MoveRoutes:
    """Which pending C-MOVE an incoming C-STORE belongs to: the one whose Message ID it carries
    (Move Originator Message ID); for a PACS that leaves that out, the only pending one."""

    def __init__(self) -> None:
        self._sinks: dict[int, Sink] = {}
        self._lock = threading.Lock()

    def register(self, msg_id: int, sink_: Sink) -> None:
        with self._lock:
            self._sinks[msg_id] = sink_

    def unregister(self, msg_id: int) -> None:
        with self._lock:
            self._sinks.pop(msg_id, None)

    def route(self, msg_id: int | None) -> Sink | None:
        with self._lock:
            found = self._sinks.get(msg_id) if msg_id is not None else None
            if found is None and len(self._sinks) == 1:
                found = next(iter(self._sinks.values()))
            return found


def c_move(pool: AssociationPool, routes: MoveRoutes, destination: str, identifier: Dataset, emit: Emit,
           token: CancelToken, msg_id: int) -> RetrieveSummary:
    """C-MOVE ``identifier`` to ``destination`` (the gateway's own storage SCP, whose ``routes``
    hand each instance to ``emit``)."""
    summary = RetrieveSummary()
    started = time.monotonic()
    routes.register(msg_id, sink(emit, summary, token))
    try:
        for attempt in (1, 2):
            conn, reused = pool.acquire()
            answered, clean = False, False
            try:
                conn.send_message(1, move_rq(MOVE, msg_id, destination), encoded(identifier, conn.accepted[1]))
                cancel_sent = False
                final = None
                for _cid, cmd, _data in messages(conn):
                    answered = True
                    if us_of(cmd, COMMAND_FIELD) != C_MOVE_RSP:
                        raise PacsUnavailable(f"C-MOVE: unexpected answer from PACS {pool.peer.aet}")
                    status = us_of(cmd, STATUS)
                    if status in PENDING:
                        if token.cancelled and not cancel_sent:
                            cancel_sent = True
                            conn.send_message(1, cancel_rq(msg_id))
                        continue
                    final = status
                    summary.status = status
                    _counts(cmd, summary)
                    break
                clean = True
            except PacsTimeout:
                raise
            except PacsUnavailable:
                if attempt == 1 and reused and not answered and summary.received == 0 and not token.cancelled:
                    log.debug("pooled association was stale; retrying C-MOVE on a new one")
                    continue
                raise
            finally:
                pool.release(conn, reusable=clean and not token.cancelled)
            if token.cancelled:
                raise Cancelled()
            _final("C-MOVE", pool.peer, final, summary)
            log.debug("C-MOVE: %d instances in %.2f s", summary.received, time.monotonic() - started)
            if summary.received == 0:
                raise summary.error or NotFound("C-MOVE: the PACS has no instances for this request")
            return summary
        raise AssertionError("unreachable")
    finally:
        routes.unregister(msg_id)
