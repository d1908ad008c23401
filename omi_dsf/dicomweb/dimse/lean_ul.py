"""A lean DICOM Upper Layer client (PS3.8) with the DIMSE command sets it needs (PS3.7).

pynetdicom moves every PDU through a polling DUL thread, an event queue and a state machine; a
dcmtk PACS sends 16 KB PDUs, so a 260 MB study is ~16,000 PDUs, and pynetdicom's per-PDU cost
(0.1-0.5 ms on a busy machine) caps a retrieval far below what ``getscu`` achieves. The gateway's
two hot paths (C-GET and C-FIND, Study Root) therefore run here: one thread, one blocking socket
read through a buffer, no polling. pynetdicom remains the engine for C-MOVE and C-STORE, and for
C-FIND/C-GET when a backend sets ``engine: pynetdicom``.
"""

from __future__ import annotations

import logging
import socket
import struct
import uuid
from typing import Iterator

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import StoragePresentationContexts
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet)

from ..errors import BadRequest, PacsTimeout, PacsUnavailable
from ..stream import CancelToken, Cancelled
from .association import STORAGE_SYNTAXES, Peer

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
# Our own implementation class UID, derived from a UUID (PS3.5 §B.2: the 2.25 root).
IMPLEMENTATION_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:omi-dsf:dicomweb-gateway').int}".encode()
IMPLEMENTATION_VERSION = b"OMI_GW_1"
MAX_PDU = 1 << 20          # what we accept; dcmtk sends at most 128 KB PDUs anyway
FIRST_CONTEXT_ID = 1

C_STORE_RQ, C_STORE_RSP, C_GET_RQ, C_GET_RSP, C_FIND_RQ, C_FIND_RSP = 0x0001, 0x8001, 0x0010, 0x8010, 0x0020, 0x8020
NO_DATA = 0x0101


def pad(uid: bytes) -> bytes:
    return uid + b"\x00" if len(uid) % 2 else uid


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set in Implicit VR Little Endian, with its group length first."""
    body = b"".join(struct.pack("<HHL", 0x0000, elem, len(v)) + v for elem, v in elements)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def us(v: int) -> bytes:
    return struct.pack("<H", v)


def parse_command(data: bytes) -> dict[int, bytes]:
    out, pos, end = {}, 0, len(data)
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        out[(group << 16) | elem] = data[pos:pos + length]
        pos += length
    return out


def us_of(cmd: dict[int, bytes], tag: int, default: int = 0) -> int:
    v = cmd.get(tag)
    return struct.unpack("<H", v[:2])[0] if v and len(v) >= 2 else default


def uid_of(cmd: dict[int, bytes], tag: int) -> bytes:
    return cmd.get(tag, b"").rstrip(b"\x00 ")


def part10_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: bytes) -> bytes:
    """Preamble, DICM and the file meta group (Explicit VR Little Endian)."""
    def el(elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB",):
            return struct.pack("<HH", 0x0002, elem) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
        return struct.pack("<HH", 0x0002, elem) + vr + struct.pack("<H", len(value)) + value
    version = IMPLEMENTATION_VERSION + (b" " if len(IMPLEMENTATION_VERSION) % 2 else b"")
    group = b"".join([el(0x0001, b"OB", b"\x00\x01"), el(0x0002, b"UI", pad(sop_class)),
                      el(0x0003, b"UI", pad(sop_instance)), el(0x0010, b"UI", pad(transfer_syntax)),
                      el(0x0012, b"UI", pad(IMPLEMENTATION_UID)), el(0x0013, b"SH", version)])
    return b"\x00" * 128 + b"DICM" + el(0x0000, b"UL", struct.pack("<L", len(group))) + group


class ReleaseRequested(PacsUnavailable):
    """The peer sent A-RELEASE-RQ (normal for a storage SCP, a failure for our requests)."""


class Connection:
    """The socket side: read whole PDUs, write P-DATA."""

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
        if length > 64 * MAX_PDU:
            raise PacsUnavailable(f"PACS {self.peer.aet} sent a PDU of {length} bytes")
        return kind, self.read_exact(length)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise PacsUnavailable(f"PACS {self.peer.aet}: connection lost ({exc.strerror or exc})") from None

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        room = max(self.peer_max_pdu, 4096) - 6 if self.peer_max_pdu else 1 << 20
        chunks = []
        for control, payload in ((0x01, command), (0x00, dataset)):
            if payload is None:
                continue
            for start in range(0, max(len(payload), 1), room):
                piece = payload[start:start + room]
                last = 0x02 if start + room >= len(payload) else 0x00
                pdv = struct.pack(">LBB", len(piece) + 2, context_id, control | last) + piece
                chunks.append(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
        self.send(b"".join(chunks))

    def abort(self) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0))
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


def get_proposals() -> list[tuple[str, list[str]]]:
    """Study Root Get (context id 1) and the storage classes that C-GET sub-operations may use."""
    return [(StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])] + [
        (cx.abstract_syntax, STORAGE_SYNTAXES) for cx in StoragePresentationContexts[:127]]


def find_proposals() -> list[tuple[str, list[str]]]:
    return [(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]


def associate_rq(calling: str, peer: Peer, proposals: list[tuple[str, list[str]]],
                 scp_roles: bool) -> tuple[bytes, dict[int, bytes]]:
    """The A-ASSOCIATE-RQ PDU and the abstract syntax of each proposed context id. With
    ``scp_roles`` every context after the first asks for the SCP role (C-GET sub-operations)."""
    contexts: dict[int, bytes] = {}
    items = [_item(0x10, APPLICATION_CONTEXT)]
    roles = []
    for index, (abstract, syntaxes) in enumerate(proposals):
        cid = 2 * index + 1
        uid = str(abstract).encode()
        contexts[cid] = uid
        body = struct.pack(">BBBB", cid, 0, 0, 0) + _item(0x30, uid) + b"".join(
            _item(0x40, str(ts).encode()) for ts in syntaxes)
        items.append(_item(0x20, body))
        if index and scp_roles:
            roles.append(_item(0x54, struct.pack(">H", len(uid)) + uid + b"\x00\x01"))
    user = (_item(0x51, struct.pack(">L", MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID) + b"".join(roles)
            + _item(0x55, IMPLEMENTATION_VERSION))
    items.append(_item(0x50, user))
    variable = b"".join(items)
    fixed = (struct.pack(">HH", 1, 0) + peer.aet.encode("ascii").ljust(16)[:16]
             + calling.encode("ascii").ljust(16)[:16] + b"\x00" * 32)
    body = fixed + variable
    return struct.pack(">BBL", 0x01, 0, len(body)) + body, contexts


def user_max_pdu(user_info: bytes, default: int) -> int:
    """The Maximum Length sub-item (0x51) of an association's User Information item, if any."""
    sub = 0
    while sub + 4 <= len(user_info):
        kind, _, length = struct.unpack_from(">BBH", user_info, sub)
        if kind == 0x51 and length == 4:
            return struct.unpack_from(">L", user_info, sub + 4)[0]
        sub += 4 + length
    return default


def parse_accept(data: bytes) -> tuple[dict[int, bytes], int]:
    """Accepted context id → transfer syntax, and the peer's maximum PDU length."""
    accepted, max_pdu, pos = {}, 16384, 68
    while pos + 4 <= len(data):
        kind, _, length = struct.unpack_from(">BBH", data, pos)
        body = data[pos + 4:pos + 4 + length]
        pos += 4 + length
        if kind == 0x21 and len(body) >= 4:
            cid, result = body[0], body[2]
            if result == 0 and len(body) >= 8:
                _, _, ts_len = struct.unpack_from(">BBH", body, 4)
                accepted[cid] = bytes(body[8:8 + ts_len]).rstrip(b"\x00 ")
        elif kind == 0x50:
            max_pdu = user_max_pdu(body, max_pdu)
    return accepted, max_pdu


def encode_identifier(ds: Dataset, transfer_syntax: bytes) -> bytes:
    return encoded(ds, implicit=transfer_syntax == ImplicitVRLittleEndian.encode())


def encoded(ds: Dataset, implicit: bool = False) -> bytes:
    """An identifier's bytes (Little Endian); BadRequest naming the key whose value cannot be
    encoded: the values come from the client (pynetdicom would log the failure with the value)."""
    try:
        return _write(ds, implicit)
    except Exception:  # noqa: BLE001 - find out which key
        pass
    for elem in ds:
        one = Dataset()
        one.add(elem)
        try:
            _write(one, implicit)
        except Exception:  # noqa: BLE001 - pydicom's reasons vary; the key is what the client needs
            raise BadRequest(f"{keyword_for_tag(elem.tag) or f'{elem.tag:08X}'}: the value cannot be "
                             "encoded for the PACS") from None
    raise BadRequest("the query cannot be encoded for the PACS")


def _write(ds: Dataset, implicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def open_association(calling_aet: str, peer: Peer, proposals, scp_roles: bool = False,
                     required: str = "Study Root C-GET") -> tuple[Connection, dict[int, bytes], dict[int, bytes]]:
    """A connection with an accepted context 1, the accepted transfer syntaxes and the proposals."""
    conn = Connection(peer)
    try:
        rq, proposed = associate_rq(calling_aet, peer, proposals, scp_roles)
        conn.sock.settimeout(peer.acse_timeout)
        conn.send(rq)
        kind, data = conn.read_pdu()
        conn.sock.settimeout(peer.dimse_timeout)
        if kind == 0x03:
            raise PacsUnavailable(f"PACS {peer.aet} at {peer.host}:{peer.port} rejected the association")
        if kind != 0x02:
            raise PacsUnavailable(f"PACS {peer.aet} at {peer.host}:{peer.port} aborted the association "
                                  "(wrong AE title, or not answering)")
        accepted, conn.peer_max_pdu = parse_accept(data)
        if FIRST_CONTEXT_ID not in accepted:
            raise PacsUnavailable(f"PACS {peer.aet} does not accept {required}")
        return conn, accepted, proposed
    except BaseException:
        conn.abort()
        raise


def messages(conn: Connection, token: CancelToken | None = None,
             prefix=None) -> Iterator[tuple[int, dict[int, bytes], bytes | None]]:
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
        kind, pdu = conn.read_pdu()
        if kind == 0x07:
            raise PacsUnavailable(f"PACS {conn.peer.aet} aborted the association")
        if kind == 0x05:
            raise ReleaseRequested(f"PACS {conn.peer.aet} released the association")
        if kind != 0x04:
            raise PacsUnavailable(f"unexpected PDU type 0x{kind:02X} from PACS {conn.peer.aet}")
        view = memoryview(pdu)
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
                    if us_of(cmd, 0x00000800, NO_DATA) == NO_DATA:
                        yield cid, cmd, None
                        cmd = None
            else:
                fragments.append(value)
                if control & 0x02:
                    head = prefix(cid, cmd) if (prefix is not None and cmd is not None) else b""
                    data = b"".join([head, *fragments]) if head else b"".join(fragments)
                    fragments = []
                    if cmd is not None:
                        yield cid, cmd, data
                        cmd = None


def release(conn: Connection) -> bool:
    """A-RELEASE; True when the PACS confirmed it. The connection is closed either way."""
    clean = False
    try:
        conn.send(struct.pack(">BBLL", 0x05, 0, 4, 0))
        conn.sock.settimeout(min(conn.peer.acse_timeout, 5))
        kind, _ = conn.read_pdu()
        clean = kind == 0x06
    except (PacsTimeout, PacsUnavailable, OSError):
        clean = False
    if clean:
        conn.close()
    else:
        conn.abort()
    return clean
