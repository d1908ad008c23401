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
_PIXEL_TAGS = {Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}
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


def _scan(ds: Dataset, identity: Identity, prefix: str, hits: list[str]) -> None:
    for elem in ds:
        tag = elem.tag
        if tag in _PIXEL_TAGS:
            continue  # samples, not text; burned-in text is covered by the flag check
        vr = elem.VR
        path = prefix + _label(tag, elem.keyword)
        if vr == "SQ":
            for i, item in enumerate(elem.value or ()):
                _scan(item, identity, f"{path}[{i}].", hits)
            continue
        value = elem.value
        if value is None or value == "" or value == b"":
            continue
        values = value if isinstance(value, (list, tuple)) or elem.VM > 1 else [value]
        if vr == "UI":
            if any(str(v) in identity.uids for v in values):
                hits.append(path)
        elif vr == "DA":
            if any(str(v)[:8] in identity.dates for v in values):
                hits.append(path)
        elif vr == "DT":
            if any(str(v)[:8] in identity.dates for v in values):
                hits.append(path)
        elif vr in _TEXT_VRS:
            if any(identity.hits_text(str(v)) for v in values):
                hits.append(path)
        elif vr in _BINARY_VRS and (tag >> 16) & 1 and isinstance(value, (bytes, bytearray)):
            # undecoded private data: look for the same strings in its bytes
            if identity.hits_text(bytes(value[:_BINARY_SCAN_LIMIT]).decode("latin-1")):
                hits.append(path)


def burned_in_problem(ds: Dataset) -> str | None:
    """Why the pixels may show identifying text, or None. We do not clean pixel data."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation (0028,0301) is YES and pixel data are not cleaned"
    if flag != "NO" and "PixelData" in ds:
        modality = str(ds.get("Modality", "") or "").upper()
        sop_class = str(ds.get("SOPClassUID", ""))
        if modality in _BURNED_IN_PRONE or sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
            return (f"BurnedInAnnotation (0028,0301) is absent for modality {modality or '?'};"
                    " such images often carry burned-in text")
    return None


def check_outgoing(ds: Dataset, identity: Identity) -> None:
    """Raise LeakError unless `ds` may leave the site."""
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        raise LeakError("PatientIdentityRemoved (0012,0062) is not YES: object was not de-identified")
    problem = burned_in_problem(ds)
    if problem:
        raise LeakError(problem)
    hits = find_leaks(ds, identity)
    if hits:
        more = f" and {len(hits) - 1} more" if len(hits) > 1 else ""
        raise LeakError(f"identifying value in {hits[0]}{more}")
