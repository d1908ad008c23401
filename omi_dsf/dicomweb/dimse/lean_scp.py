"""The gateway's C-MOVE destination on the lean Upper Layer code: a storage SCP.

A PACS answering our C-MOVE opens associations to this SCP and sends C-STORE sub-operations;
each carries the Move Originator Message ID of our request, which routes the instance to the
waiting HTTP answer (``register``/``unregister``, as :class:`~.retrieve.MoveScp`). Each incoming
association is served by one thread reading its socket; it accepts every proposed presentation
context in the first proposed transfer syntax it knows (the PACS lists what it has first).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Callable

from .association import STORAGE_SYNTAXES, Peer
from .lean_ul import (APPLICATION_CONTEXT, IMPLEMENTATION_UID, IMPLEMENTATION_VERSION, MAX_PDU,
                      C_STORE_RQ, C_STORE_RSP, NO_DATA, Connection, ReleaseRequested, _item, command, messages,
                      pad, part10_meta, uid_of, us, us_of, user_max_pdu)
from .retrieve import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, MoveRoutes
from ..errors import PacsTimeout, PacsUnavailable
from ..logs import without_message

log = logging.getLogger(__name__)

C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
VERIFICATION = b"1.2.840.10008.1.1"
SYNTAXES = [str(ts).encode() for ts in STORAGE_SYNTAXES]


def parse_request(data: bytes) -> tuple[bytes, bytes, list[tuple[int, bytes, list[bytes]]], int]:
    """Called AE, calling AE, proposed contexts (id, abstract syntax, transfer syntaxes), max PDU."""
    called, calling = data[4:20], data[20:36]
    contexts, max_pdu, pos = [], 16384, 68
    while pos + 4 <= len(data):
        kind, _, length = struct.unpack_from(">BBH", data, pos)
        body = data[pos + 4:pos + 4 + length]
        pos += 4 + length
        if kind == 0x20 and len(body) >= 4:
            cid, abstract, syntaxes, sub = body[0], b"", [], 4
            while sub + 4 <= len(body):
                skind, _, slen = struct.unpack_from(">BBH", body, sub)
                value = bytes(body[sub + 4:sub + 4 + slen]).rstrip(b"\x00 ")
                if skind == 0x30:
                    abstract = value
                elif skind == 0x40:
                    syntaxes.append(value)
                sub += 4 + slen
            contexts.append((cid, abstract, syntaxes))
        elif kind == 0x50:
            max_pdu = user_max_pdu(body, max_pdu)
    return called, calling, contexts, max_pdu


def accept_pdu(called: bytes, calling: bytes, contexts) -> tuple[bytes, dict[int, bytes]]:
    """The A-ASSOCIATE-AC PDU and the accepted transfer syntax of each context id."""
    accepted: dict[int, bytes] = {}
    items = [_item(0x10, APPLICATION_CONTEXT)]
    for cid, _abstract, syntaxes in contexts:
        chosen = next((ts for ts in syntaxes if ts in SYNTAXES), None)
        if chosen is None:
            items.append(_item(0x21, struct.pack(">BBBB", cid, 0, 4, 0) + _item(0x40, b"")))
            continue
        accepted[cid] = chosen
        items.append(_item(0x21, struct.pack(">BBBB", cid, 0, 0, 0) + _item(0x40, chosen)))
    items.append(_item(0x50, _item(0x51, struct.pack(">L", MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID)
                       + _item(0x55, IMPLEMENTATION_VERSION)))
    body = struct.pack(">HH", 1, 0) + called + calling + b"\x00" * 32 + b"".join(items)
    return struct.pack(">BBL", 0x02, 0, len(body)) + body, accepted


class LeanMoveScp(MoveRoutes):
    """Same interface as :class:`~.retrieve.MoveScp`: ``start``, ``stop``, ``register``, ``unregister``."""

    def __init__(self, aet: str, bind: str, port: int, timeout: float = 60.0):
        super().__init__()
        self.aet, self.bind, self.port, self.timeout = aet, bind, port, timeout
        self._listener: socket.socket | None = None
        self._stopping = False

    def start(self) -> "LeanMoveScp":
        listener = socket.socket(socket.AF_INET6 if ":" in self.bind else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind, self.port))
        listener.listen(16)
        listener.settimeout(0.5)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="dicomweb-move-scp", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept_loop(self) -> None:
        while not self._stopping and self._listener is not None:
            try:
                sock, addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, addr), name="dicomweb-move-assoc",
                             daemon=True).start()

    def _sink_for(self, cmd: dict[int, bytes]) -> Callable | None:
        entry, _ = self.route(us_of(cmd, 0x00001031, -1) if 0x00001031 in cmd else None)
        return entry[0] if entry else None

    def _serve(self, sock: socket.socket, addr) -> None:
        peer = Peer(aet="MOVE-SOURCE", host=str(addr[0]), port=int(addr[1]), dimse_timeout=self.timeout)
        conn = Connection(peer, sock)
        try:
            kind, data = conn.read_pdu()
            if kind != 0x01:
                conn.abort()
                return
            called, calling, contexts, peer_max = parse_request(data)
            peer.aet = calling.decode("ascii", "replace").strip()
            ac, accepted = accept_pdu(called, calling, contexts)
            conn.peer_max_pdu = peer_max
            conn.send(ac)
            abstract = {cid: a for cid, a, _ in contexts}

            def meta(cid: int, cmd: dict[int, bytes]) -> bytes:
                if us_of(cmd, 0x00000100) != C_STORE_RQ or cid not in accepted:
                    return b""
                return part10_meta(uid_of(cmd, 0x00000002), uid_of(cmd, 0x00001000), accepted[cid])

            for cid, cmd, data in messages(conn, prefix=meta):
                field = us_of(cmd, 0x00000100)
                if field == C_ECHO_RQ:
                    conn.send_message(cid, command([
                        (0x0002, pad(VERIFICATION)), (0x0100, us(C_ECHO_RSP)), (0x0120, cmd.get(0x00000110, us(0))),
                        (0x0800, us(NO_DATA)), (0x0900, us(0))]))
                    continue
                if field != C_STORE_RQ:
                    log.warning("move SCP: unexpected DIMSE command 0x%04X; aborting", field)
                    conn.abort()
                    return
                status = self._deliver(self._sink_for(cmd), data)
                conn.send_message(cid, command([
                    (0x0002, pad(uid_of(cmd, 0x00000002) or abstract.get(cid, b""))), (0x0100, us(C_STORE_RSP)),
                    (0x0120, cmd.get(0x00000110, us(0))), (0x0800, us(NO_DATA)), (0x0900, us(status)),
                    (0x1000, pad(uid_of(cmd, 0x00001000)))]))
        except ReleaseRequested:
            try:
                conn.send(struct.pack(">BBLL", 0x06, 0, 4, 0))
            except PacsUnavailable:
                pass
            conn.close()
        except (PacsUnavailable, PacsTimeout) as exc:
            log.debug("move SCP association ended: %s", exc)
            conn.abort()
        except Exception as exc:  # noqa: BLE001 - one bad association must not stop the SCP
            log.warning("move SCP association failed: %s", without_message(exc))
            conn.abort()

    @staticmethod
    def _deliver(sink: Callable | None, data: bytes | None) -> int:
        if sink is None:
            log.warning("C-STORE to the move SCP that belongs to no pending C-MOVE; refused")
            return OUT_OF_RESOURCES
        if data is None:
            return CANNOT_UNDERSTAND
        return sink(_Event(data))


class _Event:
    """What the retrieve sinks expect of a pynetdicom C-STORE event."""

    def __init__(self, data: bytes):
        self._data = data

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        return self._data
