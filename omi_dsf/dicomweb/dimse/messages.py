"""DIMSE messages (PS3.7): command sets in Implicit VR Little Endian, the requests and responses
the gateway sends, identifiers, and the Part 10 file meta group put in front of a received data set.

Command sets are written and read here rather than through pydicom datasets: a C-GET of 500
instances is 1,500 messages, and each costs microseconds this way (docs/gateway.md "DIMSE engine").
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian

from ..errors import BadRequest
from .pdu import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA, HAS_DATA = 0x0101, 0x0000

# command set elements, as tags of group 0000
AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, RESPONDED_TO = 0x00000002, 0x00000100, 0x00000110, 0x00000120
MOVE_DESTINATION, PRIORITY, DATA_SET_TYPE, STATUS = 0x00000600, 0x00000700, 0x00000800, 0x00000900
AFFECTED_SOP_INSTANCE, MOVE_ORIGINATOR_ID = 0x00001000, 0x00001031
COMPLETED, FAILED, WARNING = 0x00001021, 0x00001022, 0x00001023

PENDING = (0xFF00, 0xFF01)
SUCCESS, CANCELLED = 0x0000, 0xFE00
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122


def pad(uid: bytes | str) -> bytes:
    raw = uid.encode("ascii") if isinstance(uid, str) else uid
    return raw + b"\x00" if len(raw) % 2 else raw


def us(v: int) -> bytes:
    return struct.pack("<H", v)


def command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set in Implicit VR Little Endian, with its group length first. ``elements`` are
    (element number of group 0000, value) in ascending order."""
    body = b"".join(struct.pack("<HHL", 0x0000, elem, len(v)) + v for elem, v in elements)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


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


# -- requests -------------------------------------------------------------------------------------

def find_rq(sop_class: str, msg_id: int) -> bytes:
    return command([(0x0002, pad(sop_class)), (0x0100, us(C_FIND_RQ)), (0x0110, us(msg_id)),
                    (0x0700, us(0)), (0x0800, us(HAS_DATA))])


def get_rq(sop_class: str, msg_id: int) -> bytes:
    return command([(0x0002, pad(sop_class)), (0x0100, us(C_GET_RQ)), (0x0110, us(msg_id)),
                    (0x0700, us(0)), (0x0800, us(HAS_DATA))])


def move_rq(sop_class: str, msg_id: int, destination: str) -> bytes:
    return command([(0x0002, pad(sop_class)), (0x0100, us(C_MOVE_RQ)), (0x0110, us(msg_id)),
                    (0x0600, destination.encode("ascii").ljust(16)[:16]), (0x0700, us(0)),
                    (0x0800, us(HAS_DATA))])


def cancel_rq(msg_id: int) -> bytes:
    return command([(0x0100, us(C_CANCEL_RQ)), (0x0120, us(msg_id)), (0x0800, us(NO_DATA))])


def store_rq(sop_class: str, sop_instance: str, msg_id: int) -> bytes:
    return command([(0x0002, pad(sop_class)), (0x0100, us(C_STORE_RQ)), (0x0110, us(msg_id)),
                    (0x0700, us(0)), (0x0800, us(HAS_DATA)), (0x1000, pad(sop_instance))])


# -- responses ------------------------------------------------------------------------------------

def store_rsp(cmd: dict[int, bytes], status: int, sop_class: bytes | None = None) -> bytes:
    """The C-STORE-RSP to the C-STORE-RQ ``cmd``."""
    return command([(0x0002, pad(sop_class if sop_class is not None else uid_of(cmd, AFFECTED_SOP_CLASS))),
                    (0x0100, us(C_STORE_RSP)), (0x0120, cmd.get(MESSAGE_ID, us(0))),
                    (0x0800, us(NO_DATA)), (0x0900, us(status)),
                    (0x1000, pad(uid_of(cmd, AFFECTED_SOP_INSTANCE)))])


def echo_rsp(cmd: dict[int, bytes]) -> bytes:
    return command([(0x0002, pad("1.2.840.10008.1.1")), (0x0100, us(C_ECHO_RSP)), (0x0120, cmd.get(MESSAGE_ID, us(0))),
                    (0x0800, us(NO_DATA)), (0x0900, us(SUCCESS))])


# -- data sets ------------------------------------------------------------------------------------

def encoded(ds: Dataset, transfer_syntax: str = ImplicitVRLittleEndian) -> bytes:
    """An identifier's bytes (Little Endian); BadRequest naming the key whose value cannot be
    encoded: the values come from the client, and the message must not quote them."""
    implicit = transfer_syntax == ImplicitVRLittleEndian
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


def dataset_bytes(ds: Dataset, implicit: bool) -> bytes:
    """A data set in Little Endian, implicit or explicit VR."""
    return _write(ds, implicit)


def _write(ds: Dataset, implicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def decoded(data: bytes, transfer_syntax: str) -> Dataset:
    """An identifier the PACS sent."""
    return read_dataset(BytesIO(data), transfer_syntax == ImplicitVRLittleEndian, True)


def part10_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: bytes | str) -> bytes:
    """Preamble, DICM and the file meta group (Explicit VR Little Endian)."""
    def el(elem: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH", 0x0002, elem) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
        return struct.pack("<HH", 0x0002, elem) + vr + struct.pack("<H", len(value)) + value
    version = IMPLEMENTATION_VERSION.encode() + (b" " if len(IMPLEMENTATION_VERSION) % 2 else b"")
    group = b"".join([el(0x0001, b"OB", b"\x00\x01"), el(0x0002, b"UI", pad(sop_class)),
                      el(0x0003, b"UI", pad(sop_instance)), el(0x0010, b"UI", pad(transfer_syntax)),
                      el(0x0012, b"UI", pad(IMPLEMENTATION_UID)), el(0x0013, b"SH", version)])
    return b"\x00" * 128 + b"DICM" + el(0x0000, b"UL", struct.pack("<L", len(group))) + group
