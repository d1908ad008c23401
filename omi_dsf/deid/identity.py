"""The identifying values of one patient's study, gathered from the originals before de-identification.

Used twice: to clean free text (Clean Descriptors and the other C actions) and by the leak check
that every outgoing object must pass.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

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


class Identity:
    """Needles for one study; `regex` matches any of them as a whole word, ignoring case."""

    def __init__(self) -> None:
        self.texts: set[str] = set()       # searched in every text value
        self.dates: set[str] = set()       # YYYYMMDD, matched against DA/DT values
        self.uids: set[str] = set()        # original UIDs, matched exactly
        self._regex: re.Pattern | None = None
        self._loose: tuple[str, ...] | None = None
        self._seen: set[tuple] = set()

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
                self.texts.add(name)
                for group in name.split("="):
                    parts = group.split("^")
                    # family, given and middle names; prefix/suffix ("Dr. med.") are not identifying
                    self.texts.update(p.strip() for p in parts[:3] if len(p.strip()) >= _MIN_TOKEN)
        for kw in ID_KEYWORDS:
            self.texts.update(v for v in _values(ds, kw) if len(v) >= _MIN_TOKEN)
        if "OtherPatientIDsSequence" in ds:  # IDs the patient has in other systems
            for item in ds.OtherPatientIDsSequence or ():
                self.texts.update(v for v in _values(item, "PatientID") if len(v) >= _MIN_TOKEN)
        for kw in DATE_KEYWORDS:
            for da in _values(ds, kw):
                self.dates.add(da[:8])
                self.texts.update(_date_forms(da))
        if len(self.texts) != before:
            self._regex = None
            self._loose = None

    def add_uids(self, uids) -> None:
        self.uids.update(uids)

    @property
    def regex(self) -> re.Pattern | None:
        if self._regex is None and self.texts:
            # longest first so that "Max Mustermann" wins over "Max"
            alts = "|".join(re.escape(t) for t in sorted(self.texts, key=len, reverse=True))
            self._regex = re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)
        return self._regex

    def may_occur_in(self, blob: str) -> bool:
        """A superset test over encoded bytes (decoded 1:1): any needle anywhere, no word
        boundaries (neighbouring tag and length bytes may look like letters or digits), and
        any original UID, also with up to four characters of a following tag glued to it."""
        if self.texts:
            if self._loose is None:
                self._loose = tuple({t.lower() for t in self.texts})
            low = blob.lower()
            # plain substring search: one C-level scan per needle beats a big regex alternation
            if any(n in low for n in self._loose):
                return True
        if self.uids and "." in blob:
            for tok in _UID_TOKEN.findall(blob):
                if any(tok[:len(tok) - k] in self.uids for k in range(5)):
                    return True
        return False

    def hits_text(self, text: str) -> bool:
        rx = self.regex
        if rx is not None and rx.search(text):
            return True
        return any(tok in self.uids for tok in _UID_TOKEN.findall(text)) if "." in text else False

    def scrub(self, text: str, replacement: str = "") -> str:
        """Text with every identifying value removed (used by the C action)."""
        rx = self.regex
        out = rx.sub(replacement, text) if rx is not None else text
        if "." in out and self.uids:
            out = _UID_TOKEN.sub(lambda m: replacement if m.group(0) in self.uids else m.group(0), out)
        return out
