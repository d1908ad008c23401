"""The gateway's C-MOVE destination: a storage SCP.

A PACS answering our C-MOVE opens associations to this SCP and sends C-STORE sub-operations;
each carries the Move Originator Message ID of our request, which routes the instance to the
waiting HTTP answer (:class:`~.retrieve.MoveRoutes`). Each incoming association is served by one
thread reading its socket; every storage class is accepted in the first proposed transfer syntax
we know (the PACS lists what it has first) that is not lossy, a lossy one only when the PACS
proposes nothing else (so a PACS is never led to compress lossy for us); C-ECHO is answered.
"""

from __future__ import annotations

import logging
import socket
import threading

from ..errors import PacsTimeout, PacsUnavailable
from ..logs import without_message
from . import pdu
from .connection import Connection, Peer, ReleaseRequested, messages
from .contexts import LOSSY, storage_scp_contexts
from .messages import (AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE, C_ECHO_RQ, C_STORE_RQ, CANNOT_UNDERSTAND,
                       COMMAND_FIELD, MOVE_ORIGINATOR_ID, OUT_OF_RESOURCES, echo_rsp, part10_meta,
                       store_rsp, uid_of, us_of)
from .retrieve import MoveRoutes

log = logging.getLogger(__name__)


class MoveScp(MoveRoutes):
    """``start``, ``stop``; ``register``/``unregister`` a pending C-MOVE (MoveRoutes)."""

    def __init__(self, aet: str, bind: str, port: int, timeout: float = 60.0):
        super().__init__()
        self.aet, self.bind, self.port, self.timeout = aet, bind, port, timeout
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = False
        self._supported = storage_scp_contexts()

    def start(self) -> "MoveScp":
        listener = socket.socket(socket.AF_INET6 if ":" in self.bind else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind, self.port))
        listener.listen(16)
        listener.settimeout(0.5)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, args=(listener,), name="dicomweb-move-scp",
                                          daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stops listening; the port is free when this returns. (A listener closed while the accept
        thread waits in it stays open until that wait ends: a gateway started on the same port
        meanwhile could not bind it. shutdown ends the wait at once.)"""
        self._stopping = True
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(timeout=5)
            self._acceptor = None

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping:
            try:
                sock, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, addr), name="dicomweb-move-assoc",
                             daemon=True).start()

    def _serve(self, sock: socket.socket, addr) -> None:
        peer = Peer(aet="MOVE-SOURCE", host=str(addr[0]), port=int(addr[1]), dimse_timeout=self.timeout)
        conn = Connection(peer, sock)
        try:
            kind, data = conn.read_pdu()
            if kind != pdu.A_ASSOCIATE_RQ:
                conn.abort()
                return
            request = pdu.parse_request(data)
            peer.aet = request.calling
            ac, conn.accepted = pdu.accept(request, self._supported, LOSSY)
            conn.peer_max_pdu = request.max_pdu
            conn.send(ac)

            def meta(cid: int, cmd: dict[int, bytes]) -> bytes:
                if us_of(cmd, COMMAND_FIELD) != C_STORE_RQ or cid not in conn.accepted:
                    return b""
                return part10_meta(uid_of(cmd, AFFECTED_SOP_CLASS), uid_of(cmd, AFFECTED_SOP_INSTANCE),
                                   conn.accepted[cid])

            for cid, cmd, data in messages(conn, prefix=meta):
                field = us_of(cmd, COMMAND_FIELD)
                if field == C_ECHO_RQ:
                    conn.send_message(cid, echo_rsp(cmd))
                    continue
                if field != C_STORE_RQ:
                    log.warning("move SCP: unexpected DIMSE command 0x%04X; aborting", field)
                    conn.abort()
                    return
                target = self.route(us_of(cmd, MOVE_ORIGINATOR_ID) if MOVE_ORIGINATOR_ID in cmd else None)
                if target is None:
                    log.warning("C-STORE to the move SCP that belongs to no pending C-MOVE; refused")
                    status = OUT_OF_RESOURCES
                elif data is None or cid not in conn.accepted:
                    status = CANNOT_UNDERSTAND
                else:
                    status = target(data)
                conn.send_message(cid, store_rsp(cmd, status))
        except ReleaseRequested:
            try:
                conn.send(pdu.RELEASE_RP)
            except PacsUnavailable:
                pass
            conn.close()
        except (PacsUnavailable, PacsTimeout) as exc:
            log.debug("move SCP association ended: %s", exc)
            conn.abort()
        except Exception as exc:  # noqa: BLE001 - one bad association must not stop the SCP
            log.warning("move SCP association failed: %s", without_message(exc))
            conn.abort()
