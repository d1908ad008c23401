"""The connection and the association on it: one blocking socket per association, read through a
small buffer by the thread that uses it; whole DIMSE messages reassembled from P-DATA as they
arrive; a small pool of established associations per PACS and kind.

Every socket gets TCP_NODELAY: without it each DIMSE exchange with dcmtk or Orthanc waits ~40 ms
for a delayed ACK.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import PacsTimeout, PacsUnavailable
from ..stream import CancelToken, Cancelled
from . import pdu
from .messages import DATA_SET_TYPE, NO_DATA, parse_command, us_of

log = logging.getLogger(__name__)

_msg_ids = itertools.count(1)
_msg_lock = threading.Lock()


def next_message_id() -> int:
    """Message IDs unique across the gateway, so C-MOVE sub-operations find their request."""
    with _msg_lock:
        return next(_msg_ids) % 65535 + 1


@dataclass
class Peer:
    aet: str
    host: str
    port: int
    connect_timeout: float = 5.0
    acse_timeout: float = 10.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    max_pdu: int = 0


class ReleaseRequested(PacsUnavailable):
    """The peer sent A-RELEASE-RQ (normal for a storage SCP, a failure for our requests)."""


class Connection:
    """The socket side of one association: read whole PDUs, write P-DATA."""

    def __init__(self, peer: Peer, sock: socket.socket | None = None):
        self.peer = peer
        if sock is None:
            try:
                sock = socket.create_connection((peer.host, peer.port), timeout=peer.connect_timeout)
            except OSError as exc:
                raise PacsUnavailable(f"PACS {peer.aet} at {peer.host}:{peer.port} is not reachable "
                                      f"({exc.strerror or exc})") from None
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(peer.dimse_timeout)
        # Small buffer: dcmtk sends 128 KB PDUs, and a read larger than the buffer goes from the
        # socket straight into the PDU's bytes instead of through the buffer (one copy less).
        self.reader = self.sock.makefile("rb", buffering=1 << 14)
        self.peer_max_pdu = 16384
        self.accepted: dict[int, str] = {}     # context id → transfer syntax
        self.proposed: dict[int, str] = {}     # context id → abstract syntax
        self.closed = False

    def read_exact(self, n: int) -> bytes:
        try:
            data = self.reader.read(n)
        except socket.timeout:
            raise PacsTimeout(f"PACS {self.peer.aet} did not answer within {self.peer.dimse_timeout:g} s") from None
        except OSError as exc:
            raise PacsUnavailable(f"PACS {self.peer.aet}: connection lost ({exc.strerror or exc})") from None
        if len(data) != n:
            raise PacsUnavailable(f"PACS {self.peer.aet} closed the connection")
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBL", self.read_exact(6))
        if length > 64 * pdu.MAX_PDU:
            raise PacsUnavailable(f"PACS {self.peer.aet} sent a PDU of {length} bytes")
        return kind, self.read_exact(length)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise PacsUnavailable(f"PACS {self.peer.aet}: connection lost ({exc.strerror or exc})") from None

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        self.send(pdu.p_data(context_id, command, dataset, self.peer_max_pdu))

    def context_for(self, abstract: str, syntaxes: tuple[str, ...] = ()) -> int | None:
        """An accepted context of ``abstract`` (one whose transfer syntax is among ``syntaxes``
        first, when given)."""
        ids = [cid for cid, a in self.proposed.items() if a == abstract and cid in self.accepted]
        for ts in syntaxes:
            for cid in ids:
                if self.accepted[cid] == ts:
                    return cid
        return ids[0] if ids and not syntaxes else None

    def abort(self) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(pdu.ABORT)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.closed = True
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


def open_association(calling_aet: str, peer: Peer, proposals: tuple[pdu.Proposal, ...],
                     scp_roles: bool = False, required: str | None = None) -> Connection:
    """An established association; with ``required``, its first context must be accepted
    (PacsUnavailable naming the service otherwise)."""
    conn = Connection(peer)
    try:
        rq, conn.proposed = pdu.associate_rq(calling_aet, peer.aet, proposals, scp_roles)
        conn.sock.settimeout(peer.acse_timeout)
        conn.send(rq)
        kind, data = conn.read_pdu()
        conn.sock.settimeout(peer.dimse_timeout)
        if kind == pdu.A_ASSOCIATE_RJ:
            raise PacsUnavailable(f"PACS {peer.aet} at {peer.host}:{peer.port} rejected the association "
                                  f"({pdu.reject_reason(data)})")
        if kind != pdu.A_ASSOCIATE_AC:
            raise PacsUnavailable(f"PACS {peer.aet} at {peer.host}:{peer.port} aborted the association "
                                  "(wrong AE title, or not answering)")
        try:
            conn.accepted, conn.peer_max_pdu = pdu.parse_accept(data)
        except Exception:  # noqa: BLE001 - pynetdicom's decoder raises what it meets
            raise PacsUnavailable(f"PACS {peer.aet} sent an A-ASSOCIATE-AC that cannot be read") from None
        if required and 1 not in conn.accepted:
            raise PacsUnavailable(f"PACS {peer.aet} does not accept {required}")
        return conn
    except BaseException:
        conn.abort()
        raise


def messages(conn: Connection, token: CancelToken | None = None,
             prefix: Callable[[int, dict], bytes] | None = None) -> Iterator[tuple[int, dict[int, bytes], bytes | None]]:
    """Complete DIMSE messages as they arrive: (context id, command set, data set bytes or None).

    ``prefix(context_id, command)`` may give bytes to put in front of a data set (a Part 10
    header), so that the data set is copied only once."""
    command = bytearray()
    fragments: list = []
    cmd: dict[int, bytes] | None = None
    cid = 0
    while True:
        if token is not None and token.cancelled:
            raise Cancelled()
        kind, data = conn.read_pdu()
        if kind == pdu.A_ABORT:
            raise PacsUnavailable(f"PACS {conn.peer.aet} aborted the association")
        if kind == pdu.A_RELEASE_RQ:
            raise ReleaseRequested(f"PACS {conn.peer.aet} released the association")
        if kind != pdu.P_DATA_TF:
            raise PacsUnavailable(f"unexpected PDU type 0x{kind:02X} from PACS {conn.peer.aet}")
        view = memoryview(data)
        pos = 0
        while pos + 6 <= len(view):
            length, pcid, control = struct.unpack_from(">LBB", view, pos)
            value = view[pos + 6:pos + 4 + length]
            pos += 4 + length
            if control & 0x01:
                command += value
                if control & 0x02:
                    cmd, cid = parse_command(bytes(command)), pcid
                    command = bytearray()
                    if us_of(cmd, DATA_SET_TYPE, NO_DATA) == NO_DATA:
                        yield cid, cmd, None
                        cmd = None
            else:
                fragments.append(value)
                if control & 0x02:
                    head = prefix(cid, cmd) if (prefix is not None and cmd is not None) else b""
                    body = b"".join([head, *fragments]) if head else b"".join(fragments)
                    fragments = []
                    if cmd is not None:
                        yield cid, cmd, body
                        cmd = None


def release(conn: Connection) -> bool:
    """A-RELEASE; True when the PACS confirmed it. The connection is closed either way."""
    clean = False
    try:
        conn.send(pdu.RELEASE_RQ)
        conn.sock.settimeout(min(conn.peer.acse_timeout, 5))
        kind, _ = conn.read_pdu()
        clean = kind == pdu.A_RELEASE_RP
    except (PacsTimeout, PacsUnavailable, OSError):
        clean = False
    if clean:
        conn.close()
    else:
        conn.abort()
    return clean


class AssociationPool:
    """Up to ``size`` idle associations of one kind (the same proposals) to one PACS.

    With ``slots`` (the PACS's association limit, dicomweb/slots.py) an idle association holds a
    slot of its own, so idle and working associations together stay within the limit: one is kept
    idle only if a slot is free, and while someone waits for a slot the idle ones are closed one at
    a time, each giving its slot back (``drop_idle``, registered with the slots)."""

    def __init__(self, calling_aet: str, peer: Peer, proposals: tuple[pdu.Proposal, ...], required: str,
                 size: int = 4, idle_seconds: float = 20.0, slots=None):
        self.calling_aet, self.peer = calling_aet, peer
        self.proposals, self.required = proposals, required
        self._size, self._idle_seconds = size, idle_seconds
        self._idle: list[tuple[Connection, float, object]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._slots = slots
        if slots is not None:
            slots.on_busy(self.drop_idle)

    def _end(self, idle: list[tuple[Connection, float, object]]) -> None:
        for conn, _, slot in idle:
            release(conn)
            if slot is not None:
                self._slots.give(slot)

    def acquire(self) -> tuple[Connection, bool]:
        """An association and whether it was reused (a reused one may have been dropped meanwhile)."""
        now = time.monotonic()
        stale, found = [], None
        with self._lock:
            while self._idle:
                entry = self._idle.pop()
                if now - entry[1] < self._idle_seconds:
                    found = entry
                    break
                stale.append(entry)
        self._end(stale)
        if found is not None:
            conn, _, slot = found
            if slot is not None:
                self._slots.give(slot)   # the caller works under a slot of its own
            return conn, True
        return open_association(self.calling_aet, self.peer, self.proposals, required=self.required), False

    def release(self, conn: Connection, reusable: bool) -> None:
        if reusable and not self._closed and not conn.closed:
            slot = self._slots.take(relieve=False) if self._slots is not None else None
            if slot is not None or self._slots is None:
                with self._lock:
                    if len(self._idle) < self._size:
                        self._idle.append((conn, time.monotonic(), slot))
                        return
                if slot is not None:
                    self._slots.give(slot)
        if reusable and not conn.closed:
            release(conn)
        else:
            conn.abort()

    def drop_idle(self, all_: bool = False) -> None:
        """Close the idle association unused longest (with ``all_``: every one), giving back its slot."""
        with self._lock:
            if all_:
                idle, self._idle = self._idle, []
            else:
                idle = [self._idle.pop(0)] if self._idle else []
        self._end(idle)

    def close(self) -> None:
        self._closed = True
        self.drop_idle(all_=True)
