"""The last gate before anything leaves the site: no identifying value anywhere in the object.

Checks every element, nested sequences (UN-encoded ones included, see `un`), private elements and
the file meta, against the study's identifying values (names and their parts, IDs, accession
number, birth date, institution, original UIDs). A hit names the attribute by keyword, tag and
path, the rule that matched and the kind of value (e.g. "PatientID"), never the value.

On encoded bytes (`check_encoded`) a loose search over the bytes comes first; it finds whatever
the element check could. Only when it finds something are the elements walked, and then every
place the loose search found must lie in a value the element check examined: a find outside
them (bytes no element check read) refuses the object too.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.filereader import read_dataset
from pydicom.charset import python_encoding
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from . import un
from .identity import UID_KIND, Identity
from .refusal import Refused

_CHARSET = 0x00080005
_TEXT_VRS = {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
_BINARY_VRS = {"OB", "OW"}                      # may carry text (documents, vendor blobs)
PIXEL_TAGS = _PIXEL_TAGS = {Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}
# Modalities whose images commonly carry burned-in text when the flag is absent.
_BURNED_IN_PRONE = {"US", "SC", "OT", "XC", "ES", "GM", "SM", "DOC", "IVUS", "ECG"}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
# Values that are the same for every patient (equipment, software, code dictionaries): not
# searched for the site's values (identity.SCOPES).
_SAME_FOR_EVERY_PATIENT = frozenset(tag_for_keyword(k) for k in (
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "SecondaryCaptureDeviceManufacturer",
    "SecondaryCaptureDeviceManufacturerModelName", "SecondaryCaptureDeviceSoftwareVersions",
    "ImplementationVersionName", "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion",
    "CodeMeaning", "ContextIdentifier", "MappingResource", "DeidentificationMethod"))

RULE_UID = "UI value equal to an original UID of the study"
RULE_DATE = "DA/DT value equal to the birth date"
RULE_TEXT = "identifying value as a token in text"
RULE_CODE = "identifier as a token in a coded value (CS)"
RULE_SAME = "patient's value as a token in a value that is the same for every patient"
RULE_BINARY = "identifying value as a token in the bytes of a binary value"
RULE_OPAQUE = "identifying value inside a UN value that is no sequence (it may identify)"
RULE_BYTES = "identifying value in encoded bytes that no element check explains"


@dataclass(frozen=True)
class Hit:
    """One place an identifying value was found: attribute path, rule, kind (never the value)."""
    path: str
    rule: str
    kind: str

    def __str__(self) -> str:
        return f"identifying value in {self.path}: {self.kind} (rule: {self.rule})"


class LeakError(Refused):
    """An outgoing object may still identify the patient. `hits` name what matched (empty for
    the flag checks); the caller adds the file and instance (`locate`)."""

    def __init__(self, reason: str | None = None, hits: list[Hit] | None = None):
        hits = list(hits or ())
        if reason is None:
            reason = str(hits[0]) + (f" and {len(hits) - 1} more" if len(hits) > 1 else "")
        super().__init__(reason)
        self.hits = hits


def _label(tag: int) -> str:
    t = Tag(tag)
    name = keyword_for_tag(tag) or ("private" if t.group & 1 else "unknown")
    return f"{name} ({t.group:04X},{t.element:04X})"


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


def codec_of(ds: Dataset) -> str | None:
    """The Python codec of the dataset's character set; None: only the element-wise check fits."""
    return _codec(ds)


_MULTI_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "PN", "SH", "UC", "UI", "TM", "DS", "IS"}


class _Walker:
    """Walks a dataset; collects hits and, for encoded input, the byte ranges it examined."""

    def __init__(self, identity: Identity, spans: bool = False):
        self.identity = identity
        self.hits: list[Hit] = []
        self.spans: list[tuple[int, int]] | None = [] if spans else None
        self.places: list[tuple[int, int, str]] = []   # (value start, end, path) for naming finds

    def _examined(self, start: int, length: int, path: str) -> None:
        if self.spans is not None:
            self.spans.append((start, start + length))
            self.places.append((start, start + length, path))

    def walk(self, ds: Dataset, prefix: str = "", codec: str | None = None, base: int = 0) -> None:
        # Undecoded elements are checked on their bytes: decoding every element would cost more
        # than the rest of the pipeline together.
        codec = _codec(ds) if codec is None or 0x00080005 in ds else codec
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            tell = getattr(raw, "value_tell", None) if isinstance(raw, RawDataElement) else None
            start = base + tell if tell is not None else None
            value = raw.value
            is_bytes = isinstance(value, (bytes, bytearray))
            path = prefix + _label(tag)
            if tag in _PIXEL_TAGS:   # samples, not text; burned-in text: the flag and recipes
                if start is not None and is_bytes:
                    self._examined(start, len(value), path)
                continue
            vr = raw.VR
            if vr is None or vr == "UN":
                vr = un.value_vr(ds, tag)    # a UN sequence is parsed and put in place
            if vr == "SQ":
                self._sequence(ds, tag, raw, start, base, path, codec)
                continue
            if vr == un.OPAQUE:
                data = bytes(value or b"") if is_bytes else b""
                found = self.identity.loose_find(data.decode("latin-1"))
                if found is None and codec not in (None, "latin-1"):
                    found = self.identity.loose_find(data.decode(codec, "replace"))
                if found is not None:
                    self.hits.append(Hit(path, RULE_OPAQUE, found[1]))
                if start is not None:
                    self._examined(start, len(data), path)
                continue
            if start is not None and is_bytes:
                self._examined(start, len(value), path)
            if not value:
                continue
            if is_bytes and vr not in _BINARY_VRS:
                if codec is None:            # ISO 2022 code extensions: pydicom decodes
                    elem = ds[tag]
                    vr, value = elem.VR, elem.value
                    values = value if isinstance(value, (list, tuple)) else [value]
                else:
                    text = bytes(value).decode(codec, "replace").rstrip("\x00 ")
                    values = text.split("\\") if vr in _MULTI_VRS else [text]
            else:
                values = value if isinstance(value, (list, tuple)) else [value]
            kind, rule = self._check(vr, tag, values)
            if kind:
                self.hits.append(Hit(path, rule, kind))

    def _sequence(self, ds, tag, raw, start, base, path, codec) -> None:
        value = raw.value
        if isinstance(value, (bytes, bytearray)) and codec is not None and not self._may_hold(value, codec):
            # an undecoded sequence whose bytes hold no needle at all: nothing to find inside
            if start is not None:
                self._examined(start, len(value), path)
            return
        elem = ds[tag]
        # items decoded from this element's bytes count positions from its value; items read in
        # place from the stream (undefined length) count from the stream's start
        inner = start if (start is not None and isinstance(raw, RawDataElement)) else base
        for i, item in enumerate(elem.value or ()):
            self.walk(item, f"{path}[{i}].", codec, inner)

    def _may_hold(self, value: bytes, codec: str) -> bool:
        data = bytes(value)
        return (self.identity.may_occur_in(data.decode("latin-1"))
                or (codec != "latin-1" and self.identity.may_occur_in(data.decode(codec, "replace"))))

    def _check(self, vr: str, tag: int, values) -> tuple[str | None, str]:
        identity = self.identity
        if vr == "UI":
            return (UID_KIND if any(str(v).strip("\x00 ") in identity.uids for v in values) else None), RULE_UID
        if vr in ("DA", "DT"):
            return ("PatientBirthDate" if any(str(v).strip()[:8] in identity.dates for v in values)
                    else None), RULE_DATE
        if vr == "CS":
            if tag == _CHARSET:   # the standard's own terms ("ISO_IR 100" holds no accession "100")
                values = [v for v in values if str(v).strip() not in python_encoding]
            return _first(identity.text_kind(str(v), "ids") for v in values), RULE_CODE
        if vr in _TEXT_VRS and tag in _SAME_FOR_EVERY_PATIENT:
            return _first(identity.text_kind(str(v), "patient") for v in values), RULE_SAME
        if vr in _TEXT_VRS:
            return _first(identity.text_kind(str(v)) for v in values), RULE_TEXT
        if vr in _BINARY_VRS:
            for v in values:
                if isinstance(v, (bytes, bytearray)):
                    kind = identity.text_kind(bytes(v).decode("latin-1"))
                    if kind:
                        return kind, RULE_BINARY
        return None, ""


def _first(kinds) -> str | None:
    return next((k for k in kinds if k), None)


def find_hits(ds: Dataset, identity: Identity) -> list[Hit]:
    """Every attribute that holds an identifying value (empty list: clean)."""
    walker = _Walker(identity)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        walker.walk(meta)
    walker.walk(ds)
    return walker.hits


def find_leaks(ds: Dataset, identity: Identity) -> list[str]:
    """Paths of the attributes that hold an identifying value (empty list: clean)."""
    return [h.path for h in find_hits(ds, identity)]


def bytes_may_leak(data: bytes, codec: str | None, identity: Identity) -> bool:
    """Whether encoded bytes (decoded with `codec`) may hold an identifying value; a superset
    of what the element-wise check finds in the elements they encode."""
    return _loose(data, codec, identity) is not None


def _loose(data, codec: str | None, identity: Identity, undecidable: bool = True) -> tuple[int | None, str] | None:
    """(byte position or None, kind) of something the loose search finds in `data`. With code
    extensions (ISO 2022, codec None) nothing here decodes the text: `undecidable` says whether
    that counts as a find (the fast path: then the element walk decides)."""
    found = identity.loose_find(bytes(data).decode("latin-1"))  # 1:1, so positions are offsets
    if found is not None:
        return found
    if codec not in (None, "latin-1"):
        found = identity.loose_find(bytes(data).decode(codec, "replace"))
        if found is not None:
            return None, found[1]
    if codec is None and undecidable:
        return None, "identifying text"
    return None


def encoded_hits(data: bytes, identity: Identity, codec: str | None,
                 skip: tuple[int, int] | None = None) -> list[Hit]:
    """The leak check on Part 10 bytes. `skip`: the byte range of the pixel samples.

    Fast when clean: one loose search over the bytes outside `skip`. Otherwise the bytes are
    parsed and walked; what the loose search found outside every examined value is a hit too."""
    lo, hi = skip if skip else (len(data), len(data))
    view = memoryview(data)
    if _loose(view[:lo], codec, identity) is None and _loose(view[hi:], codec, identity) is None:
        return []
    walker = _Walker(identity, spans=True)
    for ds in _in_place(data):
        walker.walk(ds)
    if walker.hits:
        return walker.hits
    masked = bytearray(data)
    for start, end in walker.spans + [(lo, hi)]:
        masked[start:end] = bytes(end - start)
    found = _loose(masked, codec, identity, undecidable=False)
    if found is None:
        return []
    pos, kind = found
    return [Hit(_place(walker.places, pos), RULE_BYTES, kind)]


def _in_place(data: bytes) -> tuple[Dataset, Dataset]:
    """(file meta, dataset) read from Part 10 bytes with every element left undecoded, so that
    each value's position is known: dcmread decodes the elements it uses itself (TransferSyntaxUID,
    SpecificCharacterSet), which loses where they are, and bytes no element check explains are
    searched again with no boundaries ("1.2.840.10008" would hold a StudyID "1000")."""
    fp = BytesIO(data)
    if data[128:132] != b"DICM":
        return Dataset(), pydicom.dcmread(fp, force=True)
    fp.seek(132)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                        stop_when=lambda tag, vr, length: tag.group != 2)
    ts = text_of(meta, 0x00020010)
    if ts == DeflatedExplicitVRLittleEndian:   # positions are in the inflated stream
        return meta, pydicom.dcmread(BytesIO(data), force=True)
    return meta, read_dataset(fp, is_implicit_VR=ts == ImplicitVRLittleEndian,
                              is_little_endian=ts != ExplicitVRBigEndian)


def _place(places: list[tuple[int, int, str]], pos: int | None) -> str:
    if pos is None:
        return "the encoded bytes (position not known in this character set)"
    before = [(s, e, p) for s, e, p in places if s <= pos]
    if not before:
        return f"the encoded bytes at offset {pos}, before the first element"
    s, e, p = max(before, key=lambda x: x[0])
    return f"the encoded bytes at offset {pos}, after the value of {p}"


def text_of(ds: Dataset, tag: int) -> str:
    """An element's value as text without making pydicom decode (and later re-encode) it."""
    if tag not in ds:
        return ""
    value = ds.get_item(tag).value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1").strip("\x00 ")
    return str(value or "").strip()


def burned_in_problem(ds: Dataset) -> str | None:
    """Why the pixels may show identifying text, or None."""
    flag = text_of(ds, 0x00280301).upper()
    if flag == "YES":
        return "BurnedInAnnotation (0028,0301) is YES"
    if flag != "NO" and 0x7FE00010 in ds:
        modality = text_of(ds, 0x00080060).upper()
        sop_class = text_of(ds, 0x00080016)
        if modality in _BURNED_IN_PRONE or sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
            return (f"BurnedInAnnotation (0028,0301) is absent for modality {modality or '?'};"
                    " such images often carry burned-in text")
    return None


RULE_BURNED_IN = "burned-in text: pixels that may show text leave only cleaned by a pixel recipe"


def check_flags(ds: Dataset) -> None:
    """The checks that need no identity: de-identified at all, and no burned-in text."""
    if text_of(ds, 0x00120062).upper() != "YES":
        raise LeakError("PatientIdentityRemoved (0012,0062) is not YES: object was not de-identified"
                        " (rule: de-identified objects only)")
    problem = burned_in_problem(ds)
    if problem:
        raise LeakError(f"{problem} (rule: {RULE_BURNED_IN})")


def check_outgoing(ds: Dataset, identity: Identity, data: bytes | None = None,
                   skip: tuple[int, int] | None = None) -> None:
    """Raise LeakError unless `ds` may leave the site.

    `data`: the Part 10 bytes that will be sent (`skip`: where their pixel samples are). When
    given, the bytes are what is checked (see `encoded_hits`); else the dataset's elements."""
    check_flags(ds)
    hits = find_hits(ds, identity) if data is None else encoded_hits(data, identity, _codec(ds), skip)
    if hits:
        raise LeakError(hits=hits)
