"""The last gate before anything leaves the site: no identifying value anywhere in the object.

Checks every element, nested sequences, private elements and the file meta included, against
the study's identifying values (names and their parts, IDs, accession number, birth date,
institution, original UIDs). A hit names the attribute by tag and path, never the value.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from .identity import Identity

_TEXT_VRS = {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
_BINARY_VRS = {"OB", "UN", "OW"}
_BINARY_SCAN_LIMIT = 1 << 20   # private OB/UN blobs are scanned up to 1 MiB
PIXEL_TAGS = _PIXEL_TAGS = {Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}
# Modalities whose images commonly carry burned-in text when the flag is absent.
_BURNED_IN_PRONE = {"US", "SC", "OT", "XC", "ES", "GM", "SM", "DOC", "IVUS", "ECG"}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


class LeakError(Exception):
    """An outgoing object still identifies the patient; the message names the attribute."""


def _label(tag: int, keyword: str) -> str:
    t = Tag(tag)
    return f"{keyword or 'private'} ({t.group:04X},{t.element:04X})"


def find_leaks(ds: Dataset, identity: Identity) -> list[str]:
    """Paths of the attributes that hold an identifying value (empty list: clean)."""
    hits: list[str] = []
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _scan(meta, identity, "", hits)
    _scan(ds, identity, "", hits)
    return hits


# Python codecs for the character sets whose bytes we can search without pydicom's decoding.
_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8",
           "ISO_IR 101": "iso8859_2", "ISO_IR 148": "iso8859_9", "ISO_IR 203": "iso8859_15"}


def _codec(ds: Dataset) -> str | None:
    cs = ds.get_item(0x00080005) if 0x00080005 in ds else None
    if cs is None:
        return "latin-1"
    value = cs.value
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    if isinstance(value, (list, tuple)):
        value = "\\".join(value)
    key = str(value or "").strip(" \x00")
    return _CODECS.get(key)  # None: code extensions (ISO 2022 …): let pydicom decode


def _scan(ds: Dataset, identity: Identity, prefix: str, hits: list[str], codec: str | None = None) -> None:
    # Elements pydicom has not decoded yet are checked on their bytes: decoding every element
    # would cost more than the rest of the pipeline together, and writing stays cheap.
    codec = _codec(ds) if codec is None or 0x00080005 in ds else codec
    for tag in list(ds.keys()):
        if tag in _PIXEL_TAGS:
            continue  # samples, not text; burned-in text is covered by the flag check
        raw = ds.get_item(tag)
        vr = raw.VR
        value = raw.value
        is_raw = isinstance(value, (bytes, bytearray)) and vr not in _BINARY_VRS
        if vr == "SQ" and isinstance(value, (bytes, bytearray)) and codec is not None:
            # An undecoded sequence: search its bytes first (texts, dates and UIDs are ASCII or
            # in the dataset's character set); decode it only to name the element that hit.
            if not identity.hits_text(bytes(value).decode(codec, "replace")):
                continue
        if vr is None or vr == "SQ" or (is_raw and codec is None):
            elem = ds[tag]
            vr, value, is_raw = elem.VR, elem.value, False
        if vr == "SQ":
            path = prefix + _label(tag, _keyword(tag))
            for i, item in enumerate(value or ()):
                _scan(item, identity, f"{path}[{i}].", hits, codec)
            continue
        if value is None or value == "" or value == b"":
            continue
        if is_raw:
            text = bytes(value).decode(codec, "replace").rstrip("\x00 ")
            values = text.split("\\") if vr in _MULTI_VRS else [text]
        else:
            values = value if isinstance(value, (list, tuple)) else [value]
        if _hit(vr, tag, values, identity):
            hits.append(prefix + _label(tag, _keyword(tag)))


_MULTI_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "PN", "SH", "UC", "UI", "TM", "DS", "IS"}


def _keyword(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag
    return keyword_for_tag(tag)


def _hit(vr: str, tag: int, values, identity: Identity) -> bool:
    if vr == "UI":
        return any(str(v).strip("\x00 ") in identity.uids for v in values)
    if vr in ("DA", "DT"):
        return any(str(v).strip()[:8] in identity.dates for v in values)
    if vr in _TEXT_VRS:
        return any(identity.hits_text(str(v)) for v in values)
    if vr in _BINARY_VRS and (tag >> 16) & 1:
        # undecoded private data: look for the same strings in its bytes
        for v in values:
            if isinstance(v, (bytes, bytearray)) and identity.hits_text(
                    bytes(v[:_BINARY_SCAN_LIMIT]).decode("latin-1")):
                return True
    return False


def codec_of(ds: Dataset) -> str | None:
    """The Python codec of the dataset's character set; None: only the element-wise check fits."""
    return _codec(ds)


def bytes_may_leak(data: bytes, codec: str | None, identity: Identity) -> bool:
    """Whether encoded bytes (decoded with `codec`) may hold an identifying value; a superset
    of what the element-wise check finds in the elements they encode."""
    if codec is None:
        return True  # code extensions: let the element-wise check decide
    texts = {data.decode(codec, "replace")}
    texts.add(data.decode("latin-1"))  # undecoded private blobs are searched as latin-1
    return any(identity.may_occur_in(t) for t in texts)


def text_of(ds: Dataset, tag: int) -> str:
    """An element's value as text without making pydicom decode (and later re-encode) it."""
    if tag not in ds:
        return ""
    value = ds.get_item(tag).value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1").strip("\x00 ")
    return str(value or "").strip()


def burned_in_problem(ds: Dataset) -> str | None:
    """Why the pixels may show identifying text, or None. We do not clean pixel data."""
    flag = text_of(ds, 0x00280301).upper()
    if flag == "YES":
        return "BurnedInAnnotation (0028,0301) is YES and pixel data are not cleaned"
    if flag != "NO" and 0x7FE00010 in ds:
        modality = text_of(ds, 0x00080060).upper()
        sop_class = text_of(ds, 0x00080016)
        if modality in _BURNED_IN_PRONE or sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
            return (f"BurnedInAnnotation (0028,0301) is absent for modality {modality or '?'};"
                    " such images often carry burned-in text")
    return None


def check_flags(ds: Dataset) -> None:
    """The checks that need no identity: de-identified at all, and no burned-in text."""
    if text_of(ds, 0x00120062).upper() != "YES":
        raise LeakError("PatientIdentityRemoved (0012,0062) is not YES: object was not de-identified")
    problem = burned_in_problem(ds)
    if problem:
        raise LeakError(problem)


def check_outgoing(ds: Dataset, identity: Identity, encoded_header: bytes | None = None) -> None:
    """Raise LeakError unless `ds` may leave the site.

    `encoded_header`: the bytes that will be sent, up to the pixel data. When given, one search
    over them comes first; it matches wherever the element-wise check could, so only when it
    finds something are the elements walked to name the attribute.
    """
    check_flags(ds)
    if encoded_header is not None and not bytes_may_leak(encoded_header, _codec(ds), identity):
        return
    hits = find_leaks(ds, identity)
    if hits:
        more = f" and {len(hits) - 1} more" if len(hits) > 1 else ""
        raise LeakError(f"identifying value in {hits[0]}{more}")
