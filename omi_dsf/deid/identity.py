"""The identifying values of one patient's study, gathered from the originals before de-identification.

Used twice: to clean free text (Clean Descriptors and the other C actions) and by the leak check
that every outgoing object must pass.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from . import un

# Attributes whose values identify the patient, the visit or the people and site involved.
NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                 "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                 "NameOfPhysiciansReadingStudy", "RequestingPhysician", "PhysiciansOfRecord",
                 "ResponsiblePerson")
ID_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "MedicalRecordLocator",
               "PatientTelephoneNumbers", "PatientAddress", "InstitutionName", "InstitutionAddress",
               "AdmissionID", "ServiceEpisodeID", "PerformedProcedureStepID", "RequestedProcedureID")
DATE_KEYWORDS = ("PatientBirthDate",)

_MIN_TOKEN = 3          # shorter name parts ("Li", initials) would hit ordinary words
_UID_TOKEN = re.compile(r"\d+(?:\.\d+)+")
UID_KIND = "original UID"


def _date_forms(da: str) -> list[str]:
    try:
        d = datetime.strptime(da.strip()[:8], "%Y%m%d")
    except ValueError:
        return [da] if da else []
    return [d.strftime("%Y%m%d"), d.strftime("%Y-%m-%d"), d.strftime("%d.%m.%Y"), d.strftime("%d/%m/%Y")]


def _values(ds: Dataset, keyword: str) -> list[str]:
    elem = ds[keyword] if keyword in ds else None
    if elem is None or elem.VR == "SQ" or not elem.value:
        return []
    value = elem.value
    items = list(value) if isinstance(value, (list, tuple)) or elem.VM > 1 else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def _raw_bytes(ds: Dataset, keyword: str):
    tag = _TAGS[keyword]
    if tag not in ds:
        return None
    value = ds.get_item(tag).value
    return value if isinstance(value, (bytes, str)) else repr(value)


_ALL_KEYWORDS = NAME_KEYWORDS + ID_KEYWORDS + DATE_KEYWORDS + ("SpecificCharacterSet", "OtherPatientIDsSequence")
_TAGS = {kw: tag_for_keyword(kw) for kw in _ALL_KEYWORDS}
# Which needles each kind of value is searched for. "all": free text. "patient": values that are
# the same for every patient (equipment, software, code dictionaries) are not searched for the
# site's own values, which are the same for every patient too (a manufacturer's "... name here"
# is not the institution "Here"). "ids": coded values (CS) only for identifiers proper (a CS
# holding the patient ID is a leak; ImageType PERFUSION is not the name part "Perfusion").
_SITE_KINDS = ("InstitutionName", "InstitutionAddress")
_ID_KINDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "MedicalRecordLocator", "AdmissionID",
             "ServiceEpisodeID", "PerformedProcedureStepID", "RequestedProcedureID")
SCOPES = {"all": lambda kind: True,
          "patient": lambda kind: not kind.endswith(_SITE_KINDS),
          "ids": lambda kind: kind.endswith(_ID_KINDS)}


def _edge(ch: str) -> str:
    """What may not stand next to a needle that begins or ends with `ch`: the boundaries DICOM
    values have are a change of character class ("SMITH_JOHN", "SMITH^JOHN", "ID12345" hold
    SMITH and 12345), not only spaces."""
    if ch.isalpha():
        return "[^\\W\\d_]"   # another letter
    if ch.isdigit():
        return "\\d"
    return ""


def _bounded(needle: str) -> str:
    pre, post = _edge(needle[0]), _edge(needle[-1])
    return (f"(?<!{pre})" if pre else "") + re.escape(needle) + (f"(?!{post})" if post else "")


class Identity:
    """Needles for one study, each with the kind of value it is (for messages: never the value).

    `regex` matches any of them as a token (see `_edge`), ignoring case."""

    def __init__(self) -> None:
        self.texts: set[str] = set()       # searched in every text value
        self.dates: set[str] = set()       # YYYYMMDD, matched against DA/DT values
        self.uids: set[str] = set()        # original UIDs, matched exactly
        self.kinds: dict[str, str] = {}    # needle (lower case) -> kind, e.g. "PatientID"
        self._regexes: dict[str, re.Pattern] = {}
        self._loose: tuple[str, ...] | None = None
        self._seen: set[tuple] = set()

    def _add(self, text: str, kind: str) -> None:
        self.texts.add(text)
        self.kinds.setdefault(text.lower(), kind)

    def add_dataset(self, ds: Dataset) -> None:
        # The instances of a study repeat the same values: skip decoding when the raw bytes
        # of every identifying element are ones we have already taken in.
        fingerprint = tuple(_raw_bytes(ds, kw) for kw in _ALL_KEYWORDS)
        if fingerprint in self._seen:
            return
        self._seen.add(fingerprint)
        before = len(self.texts)
        for kw in NAME_KEYWORDS:
            for name in _values(ds, kw):
                self._add(name, kw)
                for group in name.split("="):
                    parts = group.split("^")
                    # family, given and middle names; prefix/suffix ("Dr. med.") are not identifying
                    for p in parts[:3]:
                        if len(p.strip()) >= _MIN_TOKEN:
                            self._add(p.strip(), f"name part of {kw}")
        for kw in ID_KEYWORDS:
            for v in _values(ds, kw):
                if len(v) >= _MIN_TOKEN:
                    self._add(v, kw)
        tag = _TAGS["OtherPatientIDsSequence"]
        if tag in ds and un.value_vr(ds, tag) == "SQ":  # IDs the patient has in other systems
            for item in ds[tag].value or ():
                for v in _values(item, "PatientID"):
                    if len(v) >= _MIN_TOKEN:
                        self._add(v, "OtherPatientIDsSequence PatientID")
        for kw in DATE_KEYWORDS:
            for da in _values(ds, kw):
                self.dates.add(da[:8])
                for form in _date_forms(da):
                    self._add(form, kw)
        if len(self.texts) != before:
            self._regexes = {}
            self._loose = None

    def add_uids(self, uids) -> None:
        self.uids.update(uids)

    @property
    def regex(self) -> re.Pattern | None:
        return self._scoped("all")

    def _scoped(self, scope: str) -> re.Pattern | None:
        rx = self._regexes.get(scope)
        if rx is None and self.texts:
            wanted = SCOPES[scope]
            needles = [t for t in self.texts if wanted(self.kinds.get(t.lower(), ""))]
            # longest first so that "Max Mustermann" wins over "Max"
            alts = "|".join(_bounded(t) for t in sorted(needles, key=len, reverse=True))
            rx = self._regexes[scope] = re.compile(alts or "(?!)", re.IGNORECASE)
        return rx

    def may_occur_in(self, blob: str) -> bool:
        """A superset test over encoded bytes (decoded 1:1): any needle anywhere, no boundaries
        (neighbouring tag and length bytes may look like letters or digits), and any original
        UID, also with up to four characters of a following tag glued to it."""
        return self.loose_find(blob) is not None

    def loose_find(self, blob: str) -> tuple[int, str] | None:
        """(position, kind) of the first needle `may_occur_in` finds, or None."""
        if self.texts:
            if self._loose is None:
                self._loose = tuple({t.lower() for t in self.texts})
            low = blob.lower()
            # plain substring search: one C-level scan per needle beats a big regex alternation
            for n in self._loose:
                pos = low.find(n)
                if pos >= 0:
                    return pos, self.kinds.get(n, "identifying text")
        if self.uids and "." in blob:
            for m in _UID_TOKEN.finditer(blob):
                tok = m.group(0)
                if any(tok[:len(tok) - k] in self.uids for k in range(5)):
                    return m.start(), UID_KIND
        return None

    def text_kind(self, text: str, scope: str = "all") -> str | None:
        """The kind of the first identifying value in `text` as a token, or None. `scope`: which
        needles (see SCOPES); original UIDs are searched in every scope."""
        rx = self._scoped(scope)
        m = rx.search(text) if rx is not None else None
        if m is not None:
            return self.kinds.get(m.group(0).lower(), "identifying text")
        if "." in text and any(tok in self.uids for tok in _UID_TOKEN.findall(text)):
            return UID_KIND
        return None

    def hits_text(self, text: str) -> bool:
        return self.text_kind(text) is not None

    def scrub(self, text: str, replacement: str = "") -> str:
        """Text with every identifying value removed (used by the C action)."""
        rx = self.regex
        out = rx.sub(replacement, text) if rx is not None else text
        if "." in out and self.uids:
            out = _UID_TOKEN.sub(lambda m: replacement if m.group(0) in self.uids else m.group(0), out)
        return out
