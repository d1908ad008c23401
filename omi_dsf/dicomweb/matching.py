"""Attribute matching as C-FIND defines it (PS3.4 §C.2.2.2): single value, wildcard, UID list, range.

Used by the embedded store, and to re-check what a PACS returned (legacy PACS ignore keys they do
not support, such as ModalitiesInStudy, so their answers need a second look).
"""

from __future__ import annotations

import re
from functools import lru_cache

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .attributes import vr_of
from .query import NUMERIC_VRS, WILDCARD_VRS, split_uid_list


@lru_cache(maxsize=512)
def _wildcard(pattern: str, fold: bool) -> re.Pattern:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.DOTALL | (re.IGNORECASE if fold else 0))


def _values(ds: Dataset, tag: int) -> list[str] | None:
    elem = ds.get(tag)
    if elem is None or elem.value is None or elem.value == "" or elem.VR == "SQ":
        return None
    value = elem.value
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    out = [str(v).strip() for v in items if v is not None and str(v).strip() != ""]
    return out or None


def _in_range(record: str, query: str) -> bool:
    """``low-high``, ``low-`` or ``-high``; a bound shorter than the value compares its prefix."""
    low, _, high = query.partition("-")
    if low and record[: len(low)] < low:
        return False
    if high and record[: len(high)] > high:
        return False
    return True


def value_matches(vr: str, record_values: list[str], query: str, fuzzy: bool) -> bool:
    if vr == "UI":
        wanted = set(split_uid_list(query))
        return any(v in wanted for v in record_values)
    if vr in ("DA", "TM", "DT"):
        if "-" in query:
            return any(_in_range(v.replace(":", ""), query) for v in record_values)
        return any(v.replace(":", "") == query or (vr != "DA" and v.startswith(query))
                   for v in record_values)
    if vr in NUMERIC_VRS:
        try:
            q = float(query)
            return any(float(v) == q for v in record_values)
        except ValueError:
            return False
    if vr in WILDCARD_VRS:
        fold = fuzzy and vr == "PN"
        alternatives = query.split("\\") if vr == "CS" else [query]
        for alt in alternatives:
            if "*" in alt or "?" in alt:
                rx = _wildcard(alt, fold)
                if any(rx.match(v) for v in record_values):
                    return True
            elif fold:
                if any(v.lower() == alt.lower() for v in record_values):
                    return True
            elif any(v == alt for v in record_values):
                return True
        return False
    return any(v == query for v in record_values)


def matches(ds: Dataset, keys: dict[int, str], fuzzy: bool = False, missing_matches: bool = False) -> bool:
    """True when ``ds`` matches every key. An attribute absent from ``ds`` matches only when
    ``missing_matches`` (a PACS answer that left the attribute out has already been filtered)."""
    for tag, query in keys.items():
        values = _values(ds, tag)
        if values is None:
            if missing_matches:
                continue
            return False
        if not value_matches(vr_of(tag), values, query, fuzzy):
            return False
    return True
