"""QIDO-RS query parameters → a checked :class:`QidoQuery` (PS3.18 §8.3.4, §10.6.1).

A parameter the gateway does not support (an unknown name, a sequence path, an attribute of a
lower level than the search, a binary attribute) is ignored, as PS3.18 §8.3 says, and named in
:attr:`QidoQuery.ignored` (the answer's Warning header). A bad value of a supported parameter is
a :class:`BadRequest` naming the parameter, so that a client learns what to fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .attributes import (GLOBAL_TAGS, INSTANCE, LEVELS, MODALITIES_IN_STUDY, MODALITY, SERIES, STUDY, level_of,
                         name_of, parse_tag, vr_of)
from .errors import BadRequest

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DA = r"\d{8}"
_TM = r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"
_DT = r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?"
_RANGE_RE = {vr: re.compile(rf"^({p})?(-({p})?)?$", re.ASCII)   # ASCII: \d would take "٢٠٢٠…"
             for vr, p in (("DA", _DA), ("TM", _TM), ("DT", _DT))}
WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
NUMERIC_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}
_INTEGER_RANGE = {"IS": (-2**31, 2**31 - 1), "US": (0, 2**16 - 1), "SS": (-2**15, 2**15 - 1), "UL": (0, 2**32 - 1),
                  "SL": (-2**31, 2**31 - 1), "UV": (0, 2**64 - 1), "SV": (-2**63, 2**63 - 1)}
_INTEGER_RE = re.compile(r"^[+-]?[0-9]{1,20}$")
_DECIMAL_RE = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$")
NOT_MATCHABLE_VRS = {"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"}
MAX_LIMIT = 100000


def is_uid(text: str) -> bool:
    return 0 < len(text) <= 64 and bool(UID_RE.match(text))


def check_uid(text: str, what: str) -> str:
    if not is_uid(text):
        raise BadRequest(f"{what} {text[:80]!r} is not a valid UID")
    return text


def split_uid_list(value: str) -> list[str]:
    return [v for v in re.split(r"[\\,]", value) if v]


@dataclass
class QidoQuery:
    level: str
    study_uid: str | None = None
    series_uid: str | None = None
    match: dict[int, str] = field(default_factory=dict)   # tag → match value (never empty)
    return_keys: set[int] = field(default_factory=set)    # includefield + empty-valued keys
    include_all: bool = False
    include_defaults: bool = True   # includedefaults=false: no PS3.18 default return keys (as dcm4chee-arc)
    fuzzy: bool = False
    empty: bool = False      # emptyvaluematching: an empty or absent value matches too (PS3.4 C.2.2.2.7)
    multiple: bool = False   # multiplevaluematching: "a\\b" or "a,b" matches either (PS3.4 C.2.2.2.8)
    ignored: list[str] = field(default_factory=list)   # unsupported parameters, ignored (PS3.18 8.3)
    limit: int | None = None
    offset: int = 0

    def match_at(self, level: str) -> dict[int, str]:
        return {t: v for t, v in self.match.items() if level_of(t, self.level) == level}


def nameable(tag: int) -> bool:
    """A tag a query may name: a data set attribute (no command, file meta or group length
    element, no item delimiter)."""
    group, element = tag >> 16, tag & 0xFFFF
    return 0 <= tag <= 0xFFFFFFFF and group >= 0x0008 and group != 0xFFFE and element != 0


def _check_value(tag: int, value: str, param: str) -> None:
    vr = vr_of(tag)
    if vr == "UI":
        for uid in split_uid_list(value):
            if not is_uid(uid):
                raise BadRequest(f"{param}: {uid[:80]!r} is not a valid UID")
        if not split_uid_list(value):
            raise BadRequest(f"{param}: empty UID list")
    elif vr in _RANGE_RE:
        if value == "-" or not _RANGE_RE[vr].match(value):
            raise BadRequest(f"{param}: {value[:40]!r} is not a {vr} value or range")
    elif vr in _INTEGER_RANGE:
        low, high = _INTEGER_RANGE[vr]
        if not _INTEGER_RE.match(value) or not low <= int(value) <= high:
            raise BadRequest(f"{param}: {value[:40]!r} is not an integer from {low} to {high} ({vr})")
    elif vr in NUMERIC_VRS:
        if not _DECIMAL_RE.match(value) or not math.isfinite(float(value)) or (vr == "DS" and len(value) > 16):
            raise BadRequest(f"{param}: {value[:40]!r} is not a finite decimal number"
                             + (" of at most 16 characters (DS)" if vr == "DS" else ""))
    elif len(value) > 1024:
        raise BadRequest(f"{param}: value too long")


def _int_param(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name}: {value[:40]!r} is not an integer") from None
    if number < minimum:
        raise BadRequest(f"{name}: must be at least {minimum}")
    return min(number, MAX_LIMIT) if name == "limit" else number


def split_values(value: str, vr: str) -> list[str]:
    """The alternatives of a multiple-value match key: separated by backslash (the DICOM value
    delimiter) or comma (QIDO-RS's list syntax)."""
    return [v for v in re.split(r"[\\,]", value) if v] if vr != "UI" else [value]


def _bool_param(name: str, value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise BadRequest(f"{name}: {value[:20]!r} is neither true nor false")
    return value.lower() == "true"


def parse_qido(params: list[tuple[str, str]], level: str, study_uid: str | None = None,
               series_uid: str | None = None) -> QidoQuery:
    """Check and collect QIDO-RS parameters for a search at ``level`` within the URL's scope."""
    assert level in LEVELS
    q = QidoQuery(level=level, study_uid=study_uid, series_uid=series_uid)
    fixed = {STUDY} if study_uid else set()
    if series_uid:
        fixed.add(SERIES)
    allowed = {STUDY: {STUDY}, SERIES: {STUDY, SERIES}, INSTANCE: {STUDY, SERIES, INSTANCE}}[level]
    seen: set[int] = set()
    keys: list[tuple[int, str, str]] = []
    for raw_name, raw_value in params:
        name, value = raw_name.strip(), raw_value.strip()
        lname = name.lower()
        if lname == "limit":
            number = _int_param("limit", value, 0)
            q.limit = number or None  # limit=0: no limit
        elif lname == "offset":
            q.offset = _int_param("offset", value, 0)
        elif lname == "fuzzymatching":
            q.fuzzy = _bool_param("fuzzymatching", value)
        elif lname == "emptyvaluematching":
            q.empty = _bool_param("emptyvaluematching", value)
        elif lname == "multiplevaluematching":
            q.multiple = _bool_param("multiplevaluematching", value)
        elif lname == "includedefaults":
            q.include_defaults = _bool_param("includedefaults", value)
        elif lname == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if not item:
                    continue
                if item.lower() == "all":
                    q.include_all = True
                    continue
                tag = None if "." in item else parse_tag(item)
                if tag is None or not nameable(tag):
                    q.ignored.append(f"includefield={item[:60]}")
                    continue
                q.return_keys.add(tag)
        elif not name or lname == "accept":   # accept: the media type, read by the caller
            continue
        else:
            tag = None if "." in name else parse_tag(name)
            if tag is None or not nameable(tag):   # an unknown parameter, a sequence path, a meta element
                q.ignored.append(name[:60])
                continue
            if level == STUDY and tag == MODALITY:   # a study's modalities are its series' modalities
                tag = MODALITIES_IN_STUDY
            if tag in seen:
                raise BadRequest(f"{name}: given more than once")
            seen.add(tag)
            attr_level = level_of(tag, level)
            if tag in GLOBAL_TAGS or attr_level not in allowed:
                q.ignored.append(name[:60])
                continue
            if attr_level in fixed:
                uid = study_uid if attr_level == STUDY else series_uid
                if name_of(tag) in ("StudyInstanceUID", "SeriesInstanceUID") and value == uid:
                    continue
                raise BadRequest(f"{name}: the {attr_level} is already fixed by the URL")
            if value == "" or value == "*":
                q.return_keys.add(tag)
                continue
            if vr_of(tag) in NOT_MATCHABLE_VRS:   # sequences, binary and unknown attributes
                q.ignored.append(name[:60])
                continue
            keys.append((tag, value, name))
    for tag, value, name in keys:   # multiplevaluematching may come after the keys
        vr = vr_of(tag)
        alternatives = split_values(value, vr) if q.multiple else [value]
        for alt in alternatives:
            _check_value(tag, alt, name)
        q.match[tag] = "\\".join(alternatives)   # as a C-FIND key has them
    return q
