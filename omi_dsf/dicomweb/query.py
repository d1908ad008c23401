"""QIDO-RS query parameters → a checked :class:`QidoQuery` (PS3.18 §8.3.4, §10.6.1).

Every problem is a :class:`BadRequest` naming the parameter, so that a client learns what to fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .attributes import (GLOBAL_TAGS, INSTANCE, LEVELS, SERIES, STUDY, level_of, name_of, parse_tag,
                         vr_of)
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
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0

    def match_at(self, level: str) -> dict[int, str]:
        return {t: v for t, v in self.match.items() if level_of(t, self.level) == level}


def check_tag(tag: int, param: str) -> int:
    """A tag a query may name: a data set attribute (no command, file meta or group length
    element, no item delimiter)."""
    group, element = tag >> 16, tag & 0xFFFF
    if not 0 <= tag <= 0xFFFFFFFF or group < 0x0008 or group == 0xFFFE or element == 0:
        raise BadRequest(f"{param[:60]}: ({group:04X},{element:04X}) is not an attribute a query can name")
    return tag


def _check_value(tag: int, value: str, param: str) -> None:
    vr = vr_of(tag)
    if vr == "SQ":
        raise BadRequest(f"{param}: matching on sequence attributes is not supported")
    if vr in NOT_MATCHABLE_VRS:
        raise BadRequest(f"{param}: matching on {vr} (binary or unknown) attributes is not supported")
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
    for raw_name, raw_value in params:
        name, value = raw_name.strip(), raw_value.strip()
        lname = name.lower()
        if lname == "limit":
            number = _int_param("limit", value, 0)
            q.limit = number or None  # limit=0: no limit
        elif lname == "offset":
            q.offset = _int_param("offset", value, 0)
        elif lname == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise BadRequest(f"fuzzymatching: {value[:20]!r} is neither true nor false")
            q.fuzzy = value.lower() == "true"
        elif lname == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if not item:
                    continue
                if item.lower() == "all":
                    q.include_all = True
                    continue
                if "." in item:
                    raise BadRequest(f"includefield: sequence paths like {item[:60]!r} are not supported")
                tag = parse_tag(item)
                if tag is None:
                    raise BadRequest(f"includefield: unknown attribute {item[:60]!r}")
                q.return_keys.add(check_tag(tag, "includefield"))
        elif not name:
            continue
        else:
            if "." in name:
                raise BadRequest(f"{name[:60]}: sequence matching is not supported")
            tag = parse_tag(name)
            if tag is None:
                raise BadRequest(f"unknown query parameter {name[:60]!r}")
            check_tag(tag, name)
            if tag in seen:
                raise BadRequest(f"{name}: given more than once")
            seen.add(tag)
            attr_level = level_of(tag, level)
            if tag in GLOBAL_TAGS:
                raise BadRequest(f"{name}: cannot be used as a matching key")
            if attr_level not in allowed:
                raise BadRequest(f"{name} is a {attr_level}-level attribute; it cannot be matched "
                                 f"in a {level} search")
            if attr_level in fixed:
                uid = study_uid if attr_level == STUDY else series_uid
                if name_of(tag) in ("StudyInstanceUID", "SeriesInstanceUID") and value == uid:
                    continue
                raise BadRequest(f"{name}: the {attr_level} is already fixed by the URL")
            if value == "" or value == "*":
                q.return_keys.add(tag)
                continue
            _check_value(tag, value, name)
            q.match[tag] = value
    return q
