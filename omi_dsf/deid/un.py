"""Elements whose VR the file does not tell: stored as UN, or implicit VR with a tag no dictionary knows.

Such an element may hold a whole dataset. PS3.5 6.2.2: a UN value is encoded in implicit VR
little endian whatever the transfer syntax (a big endian file included), so a UN element whose tag
the data dictionary knows as SQ is that sequence in implicit VR little endian. A UN element whose
tag is unknown (private elements of an unknown creator, public elements newer than the dictionary)
is a sequence when its value parses as one; otherwise it is an opaque value that may identify.

`resolve` is what de-identification, the leak check and re-identification ask of every such
element, so the three agree on what is a sequence.
"""

from __future__ import annotations

import struct
import warnings
from io import BytesIO

from pydicom.datadict import dictionary_VR, private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_sequence

ITEM = b"\xfe\xff\x00\xe0"          # (FFFE,E000) in little endian
_UNDEFINED = 0xFFFFFFFF
OPAQUE = "UN"                       # resolve(): not a sequence, not a known VR


def declared_vr(ds: Dataset, tag: int) -> str:
    """The VR the element is stored with; for implicit VR the dictionary's (public, or private
    under its creator), "UN" when no dictionary knows the tag."""
    raw = ds.get_item(tag)
    if raw.VR is not None:
        return raw.VR
    return known_vr(ds, tag) or "UN"


def known_vr(ds: Dataset, tag: int) -> str | None:
    """The data dictionary's VR for `tag` in `ds` (private: under its creator), or None."""
    if (tag >> 16) & 1:
        element = tag & 0xFFFF
        if 0x0010 <= element <= 0x00FF:
            return "LO"   # a private creator
        creator_tag = (tag & 0xFFFF0000) | (element >> 8)
        if not element & 0xFF00 or creator_tag not in ds:
            return None
        creator = ds.get_item(creator_tag).value
        if isinstance(creator, (bytes, bytearray)):
            creator = bytes(creator).decode("latin-1")
        try:
            return private_dictionary_VR(tag, str(creator or "").strip(" \x00"))
        except KeyError:
            return None
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def parse_sequence(value: bytes, encodings=None):
    """`value` parsed as a sequence in implicit VR little endian, or None when it is not one.

    The top-level items must fill the value exactly (defined lengths are followed; items of
    undefined length are left to pydicom's reader, which must then consume every byte). The raw
    elements' value_tell count from the start of `value`."""
    if len(value) < 8 or value[:4] != ITEM:
        return None
    pos, n, undefined = 0, len(value), False
    while pos < n:
        if pos + 8 > n or value[pos:pos + 4] != ITEM:
            if value[pos:pos + 4] == b"\xfe\xff\xdd\xe0" and pos + 8 == n:
                break       # a sequence delimiter kept with an undefined-length value
            return None
        (length,) = struct.unpack_from("<I", value, pos + 4)
        if length == _UNDEFINED:
            undefined = True
            break
        pos += 8 + length
    if not undefined and pos > n:
        return None
    fp = BytesIO(value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seq = read_sequence(fp, True, True, n, encodings or ["iso8859"])
            if not all(_fills(item, value) for item in seq):
                return None
    except Exception:
        return None
    if fp.tell() < n and value[fp.tell():fp.tell() + 4] != b"\xfe\xff\xdd\xe0":
        return None
    return seq


def _fills(item: Dataset, value: bytes) -> bool:
    """Whether the elements read for a defined-length item end exactly where the item ends
    (garbage that merely starts like an item does not)."""
    start = getattr(item, "seq_item_tell", None)
    if start is None or getattr(item, "is_undefined_length_sequence_item", True):
        return True
    (length,) = struct.unpack_from("<I", value, start + 4)
    elems = list(item.elements())
    if any(e.tag >> 16 == 0xFFFE for e in elems):
        return False
    if not elems:
        return length == 0
    last = elems[-1]
    if not isinstance(last, RawDataElement):
        return True     # a nested sequence of undefined length: pydicom found its delimiter
    return last.value_tell + len(last.value or b"") == start + 8 + length


def resolve(ds: Dataset, tag: int) -> str:
    """How to treat an element of `ds` whose VR is UN (or unknown in implicit VR).

    Returns "SQ" after replacing the element by the parsed sequence, the dictionary's VR when the
    tag is known as something else (pydicom decodes it on access), or OPAQUE ("UN"): a value
    nobody can interpret, which may identify."""
    raw = ds.get_item(tag)
    vr = known_vr(ds, tag)
    if vr is not None and vr not in ("SQ", "UN"):
        return vr
    value = raw.value
    if not isinstance(raw, RawDataElement) and not isinstance(value, (bytes, bytearray)):
        return raw.VR or OPAQUE    # already decoded (e.g. undefined length, read as SQ)
    if not value:
        return OPAQUE
    encodings = getattr(ds, "_character_set", None)
    seq = parse_sequence(bytes(value), [encodings] if isinstance(encodings, str) else encodings)
    if seq is None:
        return OPAQUE
    ds[tag] = DataElement(tag, "SQ", seq)
    return "SQ"


def value_vr(ds: Dataset, tag: int) -> str:
    """The VR to handle the element as: its stored VR, or for UN / unknown implicit VR what
    `resolve` decides (a parsed sequence is put in place)."""
    vr = declared_vr(ds, tag)
    return resolve(ds, tag) if vr == "UN" else vr
