"""Apply PS3.15 Table E.1-1 (Basic Profile + options) to one dataset, nested sequences included.

One `Deidentifier` serves one pseudonym domain; it is fed one instance at a time, so a study of
any size streams through it. UIDs are replaced by keyed hashes (2.25.<int>), so the same
original UID gets the same replacement in every study of the domain, and a different one in
another domain.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from importlib import resources

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from . import profile, un
from .identity import Identity
from .keys import derive

_TEXT_VRS = {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
_MAX_LEN = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "AS": 4}
_DUMMY = {
    "PN": "ANONYMIZED", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "CS": "ANONYMIZED",
    "AE": "ANONYMIZED", "LT": "ANONYMIZED", "ST": "ANONYMIZED", "UT": "ANONYMIZED",
    "UC": "ANONYMIZED", "DA": "19000101", "TM": "000000.00", "DT": "19000101000000.00",
    "AS": "000Y", "IS": "0", "DS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0,
    "FL": 0.0, "FD": 0.0,
}
# File meta elements that name the sending or receiving system, or carry private content.
_META_REMOVE = (Tag(0x0002, 0x0016), Tag(0x0002, 0x0017), Tag(0x0002, 0x0018),
                Tag(0x0002, 0x0100), Tag(0x0002, 0x0102))
_PATIENT_ATTRS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                  "PatientAge", "OtherPatientIDsSequence")
_STUDY_ATTRS = ("AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription",
                "ReferringPhysicianName")
_SHIFT_MIN_DAYS, _SHIFT_SPAN_DAYS = 365, 9 * 365


_ENCRYPTED_ATTRIBUTES = 0x04000500


def _safe_private() -> set[tuple[int, str, int]]:
    text = resources.files(__package__).joinpath("safe_private.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return {(int(r[0], 16), r[1].strip().upper(), int(r[2], 16)) for r in rows[1:]}


SAFE_PRIVATE = _safe_private()


# VRs whose raw bytes are plain ASCII, so we can read and write them without pydicom's decoding.
# Keeping elements raw matters: converting and re-encoding every touched element costs more
# than reading and writing the file.
_ASCII_VRS = {"UI", "DA", "DT", "TM", "AS", "CS", "IS", "DS"}


def _raw_strings(raw) -> list[str] | None:
    """The values of an undecoded ASCII element, or None if it is decoded or not ASCII."""
    if not isinstance(raw, RawDataElement) or raw.VR not in _ASCII_VRS:
        return None
    text = bytes(raw.value or b"").decode("latin-1").strip("\x00 ")
    return text.split("\\") if text else []


def _raw(tag: int, vr: str, values: list[str], implicit: bool) -> RawDataElement:
    data = "\\".join(values).encode("latin-1")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return RawDataElement(tag, vr, len(data), data, 0, implicit, True)


def _encode(ds: Dataset, implicit: bool) -> Dataset:
    """`ds` written and read back: every element raw, ready to be dropped into instances."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    buf.seek(0)
    return read_dataset(buf, implicit, True)


def uid_for(key: bytes, domain: str, uid: str) -> str:
    """The replacement of `uid` in `domain`: 2.25 + 128 bits of a keyed hash (PS3.5 B.2)."""
    return "2.25." + str(int.from_bytes(derive(key, "uid", domain, uid)[:16], "big"))


def date_shift_days(key: bytes, domain: str, pseudonym: str) -> int:
    """One shift per patient (1 to 10 years back), derived from the key and the pseudonym."""
    h = derive(key, "date-shift", domain, pseudonym)
    return _SHIFT_MIN_DAYS + int.from_bytes(h[:4], "big") % _SHIFT_SPAN_DAYS


@lru_cache(maxsize=4096)  # a study repeats the same few dates in every instance
def _shift_da(value: str, days: int) -> str:
    try:
        d = dt.datetime.strptime(value.strip()[:8], "%Y%m%d")
    except ValueError:
        return ""  # unparseable or partial: drop rather than keep a real date
    return (d - dt.timedelta(days=days)).strftime("%Y%m%d")


def _shift_dt(value: str, days: int) -> str:
    v = value.strip()
    if len(v) < 8:
        return ""
    head = _shift_da(v[:8], days)
    return head + v[8:] if head else ""


class Deidentifier:
    """De-identifies datasets in place for one pseudonym domain."""

    def __init__(self, key: bytes, domain: str, options=()):
        self.key = key
        self.domain = domain
        self.options = options if isinstance(options, frozenset) else profile.parse_options(options)
        self.exact, self.patterns = profile.action_table(self.options)
        self._overlay_action = self.patterns.get("60xx,3000", "X")
        self._curve_action = self.patterns.get("50xx,xxxx", "X")
        self._keep_safe_private = "rtn_safe_priv" in self.options
        self._dates = "rtn_long_modif_dates" in self.options
        self._uid_cache: dict[str, str] = {}
        self.new_uids: dict[str, str] = {}       # replacement -> original, not yet stored
        self._identity = Identity()
        self._shift = 0
        self._fast = False          # little endian: touched ASCII elements stay raw
        self._implicit = False
        self._encoded: dict[tuple, Dataset] = {}

    # -- public ----------------------------------------------------------------------------
    def patient_record(self, ds: Dataset) -> dict:
        """The patient attributes this profile removes, as DICOM JSON (kept at the site)."""
        return _subset_json(ds, _PATIENT_ATTRS)

    def study_record(self, ds: Dataset) -> dict:
        return _subset_json(ds, _STUDY_ATTRS + ("StudyInstanceUID",))

    def map_uid(self, uid: str) -> str:
        uid = str(uid).strip()
        if not uid:
            return uid
        new = self._uid_cache.get(uid)
        if new is None:
            new = uid_for(self.key, self.domain, uid)
            self._uid_cache[uid] = new
            self.new_uids[new] = uid
        return new

    @property
    def original_uids(self) -> set[str]:
        return set(self._uid_cache)

    def deidentify(self, ds: Dataset, pseudonym: str, identity: Identity) -> Dataset:
        """Apply the profile to `ds` in place. `identity` holds this study's identifying values."""
        self._identity = identity
        self._shift = date_shift_days(self.key, self.domain, pseudonym) if self._dates else 0
        implicit, little = ds.original_encoding
        self._fast = little is not False
        self._implicit = bool(implicit)
        self._walk(ds)
        for elem in self._constant_elements(pseudonym, self._implicit if self._fast else None):
            ds[elem.tag] = elem
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for tag in _META_REMOVE:
                if tag in meta:
                    del meta[tag]
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    # -- the walk --------------------------------------------------------------------------
    def _walk(self, ds: Dataset) -> None:
        private: list[int] = []
        for tag in list(ds.keys()):
            group = tag >> 16
            if group & 1:
                private.append(tag)
                continue
            if 0x5000 <= group <= 0x50FF:
                if self._curve_action == "X":
                    del ds[tag]
                continue
            if 0x6000 <= group <= 0x60FF and self._overlay_action == "X":
                # Without overlay data the rest of the group is orphaned and may hold labels.
                del ds[tag]
                continue
            action = self.exact.get(tag)
            if action is None:
                if tag & 0xFFFF == 0 or tag == _ENCRYPTED_ATTRIBUTES:
                    # group lengths would be wrong after our changes; encrypted content cannot
                    # be checked by the leak check
                    del ds[tag]
                    continue
                vr = un.declared_vr(ds, tag)  # implicit VR: the dictionary's, without decoding
                if vr == "UN":
                    vr = un.resolve(ds, tag)     # a sequence stored as UN is put in place
                    if vr == un.OPAQUE:
                        del ds[tag]   # a value nobody can interpret and no rule keeps: it may identify
                        continue
                if vr == "SQ":
                    self._walk_items(ds[tag])
                continue
            if ds.get_item(tag).VR in (None, "UN"):
                un.value_vr(ds, tag)  # stored as UN: a sequence is parsed now, not as pydicom would
            self._apply(ds, tag, action)
        if private:
            self._private(ds, private)

    def _walk_items(self, elem: DataElement) -> None:
        for item in elem.value or ():
            self._walk(item)

    def _apply(self, ds: Dataset, tag: int, action: str) -> None:
        if action == "X":
            del ds[tag]
            return
        if self._fast and self._apply_raw(ds, tag, action):
            return
        elem = ds[tag]
        vr = elem.VR
        if action == "K":
            if vr == "SQ":
                self._walk_items(elem)
        elif action == "Z":
            elem.value = Sequence() if vr == "SQ" else elem.empty_value
        elif action == "U":
            if vr == "UI":
                self._remap(elem)
            elif vr == "SQ":
                self._walk_items(elem)
            else:
                elem.value = elem.empty_value
        elif action == "D":
            self._dummy(elem)
        elif action == "C":
            self._clean(elem)
        else:  # a table typo must not let a value through
            del ds[tag]

    def _apply_raw(self, ds: Dataset, tag: int, action: str) -> bool:
        """Handle an undecoded ASCII element without decoding it; False if it needs decoding."""
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.VR is None:
            return False
        vr = raw.VR
        if action == "K" and vr != "SQ":
            return True
        if action == "Z" and vr != "SQ":
            ds[tag] = RawDataElement(tag, vr, 0, b"", 0, self._implicit, True)
            return True
        if action == "D" and vr in _TEXT_VRS and vr != "UR":
            # ASCII dummies are valid in every character set, ISO 2022 ones included
            ds[tag] = _raw(tag, vr, [str(_DUMMY[vr])], self._implicit)
            return True
        values = _raw_strings(raw)
        if values is None:
            return False
        if action == "K":
            return True
        if action == "Z":
            new = []
        elif action == "U" or (vr == "UI" and action in ("D", "C")):
            new = [self.map_uid(v) for v in values] if vr == "UI" else []
        elif action == "D":
            if vr not in _DUMMY:
                return False
            new = [str(_DUMMY[vr])]
        elif action == "C" and vr in ("DA", "DT", "TM"):
            if not self._dates:
                new = [str(_DUMMY[vr])]
            elif vr == "DA":
                new = [_shift_da(v, self._shift) for v in values]
            elif vr == "DT":
                new = [_shift_dt(v, self._shift) for v in values]
            else:
                return True  # TM: whole-day shift keeps the time of day
        else:
            return False
        ds[tag] = _raw(tag, vr, new, self._implicit)
        return True

    def _constant_elements(self, pseudonym: str, implicit: bool | None):
        """PatientName/ID and the record-keeping attributes; encoded once per pseudonym."""
        key = (pseudonym, implicit)
        cached = self._encoded.get(key)
        if cached is None:
            tmpl = Dataset()
            tmpl.PatientID = pseudonym
            tmpl.PatientName = pseudonym
            self._record(tmpl)
            cached = _encode(tmpl, implicit) if implicit is not None else tmpl
            if len(self._encoded) > 64:
                self._encoded.clear()
            self._encoded[key] = cached
        if implicit is None:  # big endian: hand out decoded copies
            import copy
            return [copy.deepcopy(e) for e in cached]
        return [cached.get_item(t) for t in cached.keys()]

    def _remap(self, elem: DataElement) -> None:
        value = elem.value
        if isinstance(value, (list, tuple)) or elem.VM > 1:
            elem.value = [self.map_uid(v) for v in value]
        elif value:
            elem.value = self.map_uid(value)

    def _dummy(self, elem: DataElement) -> None:
        vr = elem.VR
        if vr == "SQ":
            self._walk_items(elem)  # a dummy item: the same item with its own attributes de-identified
        elif vr == "UI":
            self._remap(elem)
        elif vr in _DUMMY:
            elem.value = _DUMMY[vr]
        else:
            elem.value = elem.empty_value

    def _clean(self, elem: DataElement) -> None:
        vr = elem.VR
        if vr == "SQ":
            for item in elem.value or ():
                self._walk(item)
                self._scrub_dataset(item)
        elif vr in ("DA", "DT", "TM"):
            if not self._dates:
                self._dummy(elem)
            elif vr == "DA":
                elem.value = self._map_values(elem, lambda v: _shift_da(v, self._shift))
            elif vr == "DT":
                elem.value = self._map_values(elem, lambda v: _shift_dt(v, self._shift))
            # TM: a whole-day shift leaves times of day as they are
        elif vr == "AE":
            # An AE title names a device or site: keep that it was one, not which one.
            elem.value = self._map_values(
                elem, lambda v: "AE" + derive(self.key, "ae", self.domain, v).hex()[:10].upper())
        elif vr == "UI":
            self._remap(elem)
        elif vr in _TEXT_VRS:
            elem.value = self._map_values(elem, self._scrub_text(vr))
        # numbers and codes carry no identity: kept

    def _scrub_text(self, vr: str):
        limit = _MAX_LEN.get(vr)

        def clean(v: str) -> str:
            out = " ".join(self._identity.scrub(v).split()) if v else v
            return out[:limit] if limit else out
        return clean

    def _scrub_dataset(self, ds: Dataset) -> None:
        for elem in ds:
            if elem.VR in _TEXT_VRS and elem.value:
                elem.value = self._map_values(elem, self._scrub_text(elem.VR))
            elif elem.VR == "SQ":
                for item in elem.value or ():
                    self._scrub_dataset(item)

    @staticmethod
    def _map_values(elem: DataElement, fn):
        value = elem.value
        if isinstance(value, (list, tuple)) or elem.VM > 1:
            return [fn(str(v)) for v in value]
        return fn(str(value)) if value is not None else value

    def _private(self, ds: Dataset, tags: list[int]) -> None:
        if not self._keep_safe_private:
            for tag in tags:
                del ds[tag]
            return
        keep_blocks: set[int] = set()
        for tag in tags:
            elem_no = tag & 0xFFFF
            if elem_no < 0x1000:
                continue  # creators and group lengths: decided below
            group, slot = tag >> 16, elem_no >> 8
            creator_tag = (group << 16) | slot
            creator = ds.get(creator_tag)
            name = str(creator.value).strip().upper() if creator is not None else ""
            if (group, name, elem_no & 0xFF) in SAFE_PRIVATE:
                keep_blocks.add(creator_tag)
                if un.value_vr(ds, tag) == "SQ":   # kept by the rule: a UN value stays as it is
                    self._walk_items(ds[tag])
            else:
                del ds[tag]
        for tag in tags:
            if (tag & 0xFFFF) < 0x1000 and tag not in keep_blocks and tag in ds:
                del ds[tag]

    # -- record keeping (PS3.15 E.1.1, PS3.3 C.7.1.1 / C.12.1) --------------------------------
    def _record(self, ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        names = ["OMI-DSF PS3.15 E.1-1 Basic Profile"]
        codes = [profile.BASIC_PROFILE_CODE]
        for option in sorted(self.options):
            code, meaning = profile.OPTION_CODES[option]
            codes.append((code, meaning))
            names.append(meaning[:64])
        ds.DeidentificationMethod = names
        ds.DeidentificationMethodCodeSequence = Sequence([profile.dcm_code(c, m) for c, m in codes])
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self._dates else "REMOVED"


def _subset_json(ds: Dataset, keywords) -> dict:
    sub = Dataset()
    for kw in keywords:
        if kw in ds:
            sub[kw] = ds[kw]
    return sub.to_json_dict()
