"""Application entity, presentation contexts and a small pool of established associations.

Every socket gets TCP_NODELAY: without it each DIMSE exchange with dcmtk/Orthanc waits ~40 ms for
a delayed ACK (docs: dicomweb-facts.md §0.1).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
                         RLELossless)
from pynetdicom import AE, StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)

from ..errors import PacsUnavailable

log = logging.getLogger(__name__)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# What we accept on storage contexts (C-GET sub-operations and the C-MOVE SCP): as stored.
STORAGE_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless]

_msg_ids = itertools.count(1)
_msg_lock = threading.Lock()


def next_message_id() -> int:
    """Message IDs unique across the gateway, so C-MOVE sub-operations find their request."""
    with _msg_lock:
        return next(_msg_ids) % 65535 + 1


# pynetdicom's DUL thread sleeps this long whenever it finds nothing to do; during a transfer
# that delay is paid per PDU and per C-STORE response, so busy associations poll faster.
IDLE_LOOP_DELAY = 0.001
BUSY_LOOP_DELAY = 0.0002


def _recv_exact(self, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv reading straight into one buffer (pynetdicom reads 4 KB at a time)."""
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = self.socket.recv_into(view[got:], nr_bytes - got)
        if not n:  # connection closed: what we have, as pynetdicom's own recv does
            return buf[:got]
        got += n
    return buf


def set_nodelay(event, busy: bool = False) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the association's socket, and a faster recv."""
    try:
        wrapper = event.assoc.dul.socket
        sock = wrapper.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wrapper.recv = types.MethodType(_recv_exact, wrapper)
        if busy:
            event.assoc.dul._run_loop_delay = BUSY_LOOP_DELAY
    except (AttributeError, OSError):
        log.debug("could not tune the association socket", exc_info=True)


def set_nodelay_busy(event) -> None:
    set_nodelay(event, busy=True)


@contextmanager
def busy(assoc: Association) -> Iterator[None]:
    """Poll fast while this association transfers data; idle pooled associations poll slowly."""
    dul = getattr(assoc, "dul", None)
    if dul is not None:
        dul._run_loop_delay = BUSY_LOOP_DELAY
    try:
        yield
    finally:
        if dul is not None:
            dul._run_loop_delay = IDLE_LOOP_DELAY


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


def find_contexts():
    return [build_context(StudyRootQueryRetrieveInformationModelFind, UNCOMPRESSED)]


def move_contexts():
    return [build_context(StudyRootQueryRetrieveInformationModelMove, UNCOMPRESSED)]


def get_contexts():
    """C-GET needs a storage context (with SCP role) for every SOP class it may receive: the
    Get context plus pynetdicom's 120 storage classes fit the 128-context limit."""
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet, UNCOMPRESSED)]
    roles = []
    for cx in StoragePresentationContexts[:127]:
        contexts.append(build_context(cx.abstract_syntax, STORAGE_SYNTAXES))
        roles.append(build_role(cx.abstract_syntax, scp_role=True))
    return contexts, roles


def make_ae(calling_aet: str, peer: Peer) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = peer.connect_timeout
    ae.acse_timeout = peer.acse_timeout
    ae.dimse_timeout = peer.dimse_timeout
    ae.network_timeout = peer.network_timeout
    ae.maximum_pdu_size = peer.max_pdu
    return ae


def associate(calling_aet: str, peer: Peer, contexts, roles=None,
              handlers: list | None = None) -> Association:
    """An established association, or :class:`PacsUnavailable` saying why not."""
    ae = make_ae(calling_aet, peer)
    all_handlers = [(evt.EVT_CONN_OPEN, set_nodelay), *(handlers or [])]
    try:
        assoc = ae.associate(peer.host, peer.port, contexts=contexts, ae_title=peer.aet,
                             ext_neg=roles or None, evt_handlers=all_handlers,
                             max_pdu=peer.max_pdu)
    except (OSError, RuntimeError) as exc:
        raise PacsUnavailable(f"PACS {peer.aet} at {peer.host}:{peer.port}: {exc}") from None
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "rejected the association"
        elif assoc.is_aborted:
            why = "aborted the association (wrong AE title, or not answering)"
        else:
            why = "is not reachable"
        raise PacsUnavailable(f"PACS {peer.aet} at {peer.host}:{peer.port} {why}")
    return assoc


class AssociationPool:
    """Keeps up to ``size`` idle associations of one kind (same contexts) to one PACS."""

    def __init__(self, calling_aet: str, peer: Peer, factory: Callable[[], tuple], size: int = 4,
                 idle_seconds: float = 20.0, handlers: list | None = None):
        self.calling_aet = calling_aet
        self.peer = peer
        self._factory = factory            # → (contexts, roles)
        self._handlers = handlers or []
        self._size = size
        self._idle_seconds = idle_seconds
        self._idle: list[tuple[Association, float]] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> tuple[Association, bool]:
        """An association and whether it was reused (a reused one may have been dropped meanwhile)."""
        now = time.monotonic()
        stale = []
        with self._lock:
            while self._idle:
                assoc, since = self._idle.pop()
                if now - since < self._idle_seconds and assoc.is_established:
                    for old in stale:
                        _quiet_release(old)
                    return assoc, True
                stale.append(assoc)
        for old in stale:
            _quiet_release(old)
        contexts, roles = self._factory()
        return associate(self.calling_aet, self.peer, contexts, roles, self._handlers), False

    def release(self, assoc: Association, reusable: bool = True) -> None:
        if reusable and assoc.is_established and not self._closed:
            with self._lock:
                if len(self._idle) < self._size:
                    self._idle.append((assoc, time.monotonic()))
                    return
        if assoc.is_established:
            _quiet_release(assoc)

    @contextmanager
    def lease(self) -> Iterator[tuple[Association, bool]]:
        assoc, reused = self.acquire()
        ok = False
        try:
            yield assoc, reused
            ok = True
        finally:
            self.release(assoc, reusable=ok)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for assoc, _ in idle:
            _quiet_release(assoc)


def _quiet_release(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # noqa: BLE001
        try:
            assoc.abort()
        except Exception:  # noqa: BLE001
            pass


def abort(assoc: Association) -> None:
    try:
        if not assoc.is_aborted and not assoc.is_released:
            assoc.abort()
    except Exception:  # noqa: BLE001
        log.debug("abort failed", exc_info=True)
