"""Checks on untrusted Part 10 bytes (a STOW-RS part) before pydicom parses them.

pydicom reads what it can: a file cut off in the middle parses without an error, a deflated
data set is inflated whole (a 2 MB deflate bomb becomes 500 MB), and deeply nested sequences
end in a RecursionError. :func:`check` walks the whole file element by element instead,
decoding no values, in one linear pass with bounded memory: it refuses a file that is cut
off, has an unknown VR, nests sequences deeper than :data:`MAX_DEPTH`, names a transfer syntax
the gateway does not know, or inflates past the configured limit (counted while inflating,
in steps of 64 KB, so memory stays at a step whatever the stream claims).
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import zlib
from dataclasses import dataclass

from pydicom.datadict import DicomDictionary
from pydicom.uid import (AllTransferSyntaxes, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ImplicitVRLittleEndian)

CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
OUT_OF_RESOURCES = 0xA700

MAX_DEPTH = 64          # sequences within sequences (deep SR trees stay far below)
STEP = 1 << 16
KNOWN_SYNTAXES = {str(ts) for ts in AllTransferSyntaxes}
# explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1)
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
             b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010


class Refused(ValueError):
    """The file is not one the gateway stores: ``status`` is the STOW-RS Failure Reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason
        self.meta: Meta | None = None   # the file meta information, when it could be read


@dataclass
class Meta:
    transfer_syntax: str
    sop_class: str          # (0002,0002) and (0002,0003): for the failure answer
    sop_instance: str


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def _explicit_le(buf: bytes, pos: int) -> tuple[int, int, int, int] | None:
    """(group, element, value length, value offset) of the Explicit VR Little Endian element at
    ``pos``; None when its header is not all in ``buf`` or its VR is unknown."""
    if pos + 8 > len(buf):
        return None
    group, elem, vr, short = struct.unpack_from("<HH2sH", buf, pos)
    if vr in SHORT_VRS:
        return group, elem, short, pos + 8
    if vr in LONG_VRS and pos + 12 <= len(buf):
        return group, elem, struct.unpack_from("<L", buf, pos + 8)[0], pos + 12
    return None


def read_meta(data: bytes) -> tuple[Meta, int]:
    """The file meta information and where the data set starts."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise Refused(CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no DICM prefix)")
    pos, values = 132, {}
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        header = _explicit_le(data, pos)
        if header is None:
            raise Refused(CANNOT_UNDERSTAND, "file meta information: unknown VR or cut off")
        _, elem, length, pos = header
        if length == UNDEFINED or pos + length > len(data):
            raise Refused(CANNOT_UNDERSTAND, "file meta information is cut off")
        values[elem] = bytes(data[pos:pos + length])
        pos += length
    ts = _text(values.get(0x0010, b""))
    meta = Meta(ts, _text(values.get(0x0002, b"")), _text(values.get(0x0003, b"")))
    if not ts:
        raise Refused(CANNOT_UNDERSTAND, "file meta information has no transfer syntax")
    if ts not in KNOWN_SYNTAXES:
        raise Refused(TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {ts[:64]!r} is not supported")
    return meta, pos


def inflated_size(data: bytes, start: int, limit: int) -> int:
    """Bytes a raw deflate stream inflates to; Refused past ``limit`` or when cut off. Nothing
    is kept: each step's output is counted and dropped. An element in the first step whose
    declared length alone goes past the limit (the usual bomb: one huge Pixel Data of zeros) is
    refused before anything more is inflated."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view, pos, total = memoryview(data), start, 0
    too_big = Refused(OUT_OF_RESOURCES, f"inflates to more than {limit >> 20} MB")
    try:
        while not inflater.eof:
            if inflater.unconsumed_tail:
                chunk = inflater.unconsumed_tail
            elif pos < len(view):
                chunk, pos = view[pos:pos + STEP], pos + STEP
            else:
                break
            out = inflater.decompress(chunk, STEP)
            if total == 0 and _declared_end(out) > limit:
                raise too_big
            total += len(out)
            if total > limit:
                raise too_big
    except zlib.error:
        raise Refused(CANNOT_UNDERSTAND, "deflated data set is corrupt") from None
    if not inflater.eof:
        raise Refused(CANNOT_UNDERSTAND, "deflated data set is cut off")
    return total


def _inflated(data: bytes, start: int, limit: int) -> bytes:
    inflated_size(data, start, limit)   # counted first: nothing past the limit is ever held
    return zlib.decompress(memoryview(data)[start:], -zlib.MAX_WBITS)


def at_low_priority(fn, *args):
    """``fn(*args)`` in a thread of its own at the lowest CPU priority (Linux: nice 19 for that
    thread only), so that inflating what a client sent, up to the limit, yields the cores to
    everything else the gateway does (a deflate bomb stream costs ~0.5 s of CPU per 256 MB)."""
    outcome: list = []

    def run() -> None:
        if sys.platform.startswith("linux"):   # there a thread id is a task: only this thread
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name="omi-inflate", daemon=True)
    worker.start()
    worker.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _declared_end(prefix: bytes) -> int:
    """How far the top-level elements that start in ``prefix`` (Explicit VR Little Endian) say the
    data set goes, as far as their headers can be read there."""
    pos, end = 0, 0
    while (header := _explicit_le(prefix, pos)) is not None and header[2] != UNDEFINED:
        pos = header[3] + header[2]
        end = max(end, pos)
    return end


def _walk(buf: bytes, pos: int, implicit: bool, little: bool) -> None:
    """Every element's header, every item and delimiter, up to the end of ``buf``."""
    end_of = len(buf)
    order = "<" if little else ">"
    head = struct.Struct(order + "HH2sH")   # tag, explicit VR, short length (or reserved)
    u32 = struct.Struct(order + "L")
    # open containers: [kind, end offset or None (undefined length), implicit]; kind is
    # "seq" (items follow), "item" (elements follow) or "frag" (encapsulated pixel data fragments)
    stack: list[list] = []
    depth = 0
    kind, here_implicit, limit = "item", implicit, end_of
    while True:
        if pos >= limit:
            if pos > limit:
                raise Refused(CANNOT_UNDERSTAND, "the file is cut off" if limit == end_of
                              else "an element runs past the end of its sequence or item")
            if not stack:
                return
            if stack[-1][1] is None:
                raise Refused(CANNOT_UNDERSTAND, "the file is cut off inside a sequence")
            depth -= stack.pop()[0] == "seq"
            kind, here_implicit, limit = _top(stack, implicit, end_of)
            continue
        if pos + 8 > end_of:
            raise Refused(CANNOT_UNDERSTAND, "the file is cut off")
        group, elem, vr, short = head.unpack_from(buf, pos)
        if group == 0xFFFE:
            tag = group << 16 | elem
            length = u32.unpack_from(buf, pos + 4)[0]
            pos += 8
            if tag == ITEM and kind == "frag":
                if length == UNDEFINED or pos + length > end_of:
                    raise Refused(CANNOT_UNDERSTAND, "the pixel data is cut off")
                pos += length
                continue
            if tag == ITEM and kind == "seq":
                stack.append(["item", None if length == UNDEFINED else pos + length, here_implicit])
            elif tag == ITEM_END and kind == "item" and stack and stack[-1][1] is None:
                stack.pop()
            elif tag == SEQ_END and kind in ("seq", "frag") and stack[-1][1] is None:
                depth -= stack.pop()[0] == "seq"
            else:
                raise Refused(CANNOT_UNDERSTAND, "misplaced item or delimiter")
            kind, here_implicit, limit = _top(stack, implicit, end_of)
            continue
        if kind != "item":
            raise Refused(CANNOT_UNDERSTAND, "an element where a sequence item belongs")
        if here_implicit:
            vr, length, pos = None, u32.unpack_from(buf, pos + 4)[0], pos + 8
        elif vr in SHORT_VRS:
            length, pos = short, pos + 8
        elif vr in LONG_VRS:
            if pos + 12 > end_of:
                raise Refused(CANNOT_UNDERSTAND, "the file is cut off")
            length, pos = u32.unpack_from(buf, pos + 8)[0], pos + 12
        else:
            raise Refused(CANNOT_UNDERSTAND, f"element ({group:04X},{elem:04X}) has an unknown VR")
        if length != UNDEFINED and vr != b"SQ" and (vr is not None or DicomDictionary.get(
                group << 16 | elem, ("",))[0] != "SQ"):
            pos += length   # a plain value (checked against the end when the next element is read)
            continue
        if length == UNDEFINED:
            if (group << 16 | elem) == PIXEL_DATA or vr in (b"OB", b"OW"):
                stack.append(["frag", None, here_implicit])
            elif vr in (b"SQ", b"UN", None):
                # an undefined-length UN is a sequence in Implicit VR Little Endian (PS3.5 6.2.2)
                stack.append(["seq", None, here_implicit or vr == b"UN"])
                depth += 1
            else:
                raise Refused(CANNOT_UNDERSTAND, f"element ({group:04X},{elem:04X}) has an undefined length")
        else:
            if pos + length > limit:
                raise Refused(CANNOT_UNDERSTAND, "the file is cut off")
            stack.append(["seq", pos + length, here_implicit])
            depth += 1
        if depth > MAX_DEPTH:
            raise Refused(CANNOT_UNDERSTAND, f"sequences nested deeper than {MAX_DEPTH} levels")
        kind, here_implicit, limit = _top(stack, implicit, end_of)


def _top(stack: list, implicit: bool, end_of: int) -> tuple[str, bool, int]:
    """What the innermost open container allows: (kind, implicit VR, where it ends)."""
    for _kind, end, _ in reversed(stack):
        if end is not None:
            break
    else:
        end = end_of
    if not stack:
        return "item", implicit, end_of
    return stack[-1][0], stack[-1][2], end


def check(data: bytes, max_inflated: int) -> Meta:
    """The file meta information of a complete, well-formed Part 10 file; :class:`Refused`
    (with the STOW-RS Failure Reason) otherwise."""
    meta, start = read_meta(data)
    ts = meta.transfer_syntax
    try:
        if ts == DeflatedExplicitVRLittleEndian:
            data, start = at_low_priority(_inflated, data, start, max_inflated), 0
        implicit = ts == ImplicitVRLittleEndian
        if not implicit and bytes(data[start + 4:start + 6]) not in LONG_VRS | SHORT_VRS | {b""}:
            implicit = True   # written in Implicit VR despite the meta information (pydicom reads it so too)
        _walk(data, start, implicit=implicit, little=ts != ExplicitVRBigEndian)
    except Refused as exc:
        exc.meta = meta
        raise
    return meta
