"""C-FIND (Study Root) over the lean Upper Layer client, on a small pool of open associations."""

from __future__ import annotations

import logging
import threading
import time
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from ..errors import BadRequest, PacsTimeout, PacsUnavailable
from .association import Peer
from .lean_ul import (C_FIND_RSP, FIRST_CONTEXT_ID, C_FIND_RQ, Connection, command, encode_identifier,
                      find_proposals, messages, open_association, pad, release, us, us_of)
from pydicom.uid import ImplicitVRLittleEndian

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)


class LeanFindPool:
    def __init__(self, calling_aet: str, peer: Peer, size: int = 4, idle_seconds: float = 20.0):
        self.calling_aet, self.peer = calling_aet, peer
        self._size, self._idle_seconds = size, idle_seconds
        self._idle: list[tuple[Connection, dict, dict, float]] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> tuple[Connection, dict, dict, bool]:
        now = time.monotonic()
        stale = []
        found = None
        with self._lock:
            while self._idle:
                conn, accepted, proposed, since = self._idle.pop()
                if now - since < self._idle_seconds:
                    found = (conn, accepted, proposed, True)
                    break
                stale.append(conn)
        for conn in stale:
            release(conn)
        if found:
            return found
        conn, accepted, proposed = open_association(self.calling_aet, self.peer, find_proposals(),
                                                    required="Study Root C-FIND")
        return conn, accepted, proposed, False

    def release(self, conn: Connection, accepted: dict, proposed: dict, reusable: bool) -> None:
        if reusable and not self._closed:
            with self._lock:
                if len(self._idle) < self._size:
                    self._idle.append((conn, accepted, proposed, time.monotonic()))
                    return
        if reusable:
            release(conn)
        else:
            conn.abort()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, *_ in idle:
            release(conn)


def lean_c_find(pool: LeanFindPool, identifier: Dataset, msg_id: int = 1) -> list[Dataset]:
    """All matches of a C-FIND; PacsUnavailable/PacsTimeout, never a hang."""
    for attempt in (1, 2):
        conn, accepted, proposed, reused = pool.acquire()
        ts = accepted[FIRST_CONTEXT_ID]
        implicit = ts == ImplicitVRLittleEndian.encode()
        results: list[Dataset] = []
        ok = False
        try:
            payload = encode_identifier(identifier, ts)
        except BadRequest:   # a value the client sent; nothing went to the PACS
            pool.release(conn, accepted, proposed, reusable=True)
            raise
        try:
            conn.send_message(FIRST_CONTEXT_ID, command([
                (0x0002, pad(proposed[FIRST_CONTEXT_ID])), (0x0100, us(C_FIND_RQ)), (0x0110, us(msg_id)),
                (0x0700, us(0)), (0x0800, us(0x0000))]), payload)
            for _cid, cmd, data in messages(conn):
                if us_of(cmd, 0x00000100) != C_FIND_RSP:
                    raise PacsUnavailable(f"C-FIND: unexpected answer from PACS {pool.peer.aet}")
                status = us_of(cmd, 0x00000900)
                if status in PENDING:
                    if data:
                        results.append(read_dataset(BytesIO(data), implicit, True))
                    continue
                if status == 0x0000:
                    ok = True
                    break
                if status == 0xFE00:
                    raise PacsUnavailable("C-FIND was cancelled by the PACS")
                ok = True  # the association itself is fine
                raise PacsUnavailable(f"C-FIND: PACS {pool.peer.aet} answered with failure status "
                                      f"0x{status:04X}")
        except PacsTimeout:
            pool.release(conn, accepted, proposed, reusable=False)
            raise
        except PacsUnavailable:
            pool.release(conn, accepted, proposed, reusable=ok)
            if attempt == 1 and reused and not ok and not results:
                log.debug("pooled association was stale; retrying C-FIND on a new one")
                continue
            raise
        pool.release(conn, accepted, proposed, reusable=True)
        return results
    raise AssertionError("unreachable")
