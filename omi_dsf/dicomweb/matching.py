"""Attribute matching as C-FIND defines it (PS3.4 §C.2.2.2): single value, wildcard, UID list, range.

Used by the embedded store, and to re-check what a PACS returned (legacy PACS ignore keys they do
not support, such as ModalitiesInStudy, so their answers need a second look).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .attributes import vr_of
from .query import NUMERIC_VRS, WILDCARD_VRS, split_uid_list, split_values


def _find(value: str, piece: str, start: int, end: int) -> int:
    """Leftmost position >= ``start`` where ``piece`` (literals and ``?``) fits before ``end``; -1 if none.

    A piece with ``?`` is found by bit-parallel matching (shift-and): one pass over the value
    whatever the piece, so no input makes this quadratic."""
    if "?" not in piece:
        return value.find(piece, start, end)
    k = len(piece)
    if start + k > end:
        return -1
    any_char = sum(1 << i for i, c in enumerate(piece) if c == "?")
    masks: dict[str, int] = {}
    for i, c in enumerate(piece):
        if c != "?":
            masks[c] = masks.get(c, any_char) | 1 << i
    if not masks:
        return start
    found, state = 1 << (k - 1), 0
    for j in range(start, end):
        state = ((state << 1) | 1) & masks.get(value[j], any_char)
        if state & found:
            return j - k + 1
    return -1


def wildcard_match(pattern: str, value: str) -> bool:
    """``*`` (any run) and ``?`` (any one character) matching without backtracking: the pieces
    between ``*`` are found leftmost, in order, the first one anchored at the start and the last
    at the end. Each piece is looked for once, so the time grows with len(pattern) x len(value)
    at worst instead of exponentially (a regex on ``*a*a*a*a*b`` against 64 "a" took 16 s)."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return len(value) == len(pattern) and _find(value, pattern, 0, len(value)) == 0
    head, *middle, tail = pieces
    if len(head) + len(tail) > len(value):
        return False
    if head and _find(value, head, 0, len(head)) != 0:
        return False
    end = len(value) - len(tail)
    if tail and _find(value, tail, end, len(value)) != end:
        return False
    pos = len(head)
    for piece in middle:
        if piece:
            i = _find(value, piece, pos, end)
            if i < 0:
                return False
            pos = i + len(piece)
    return True


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
                pattern = alt.lower() if fold else alt
                if any(wildcard_match(pattern, v.lower() if fold else v) for v in record_values):
                    return True
            elif fold:
                if any(v.lower() == alt.lower() for v in record_values):
                    return True
            elif any(v == alt for v in record_values):
                return True
        return False
    return any(v == query for v in record_values)


def matches(ds: Dataset, keys: dict[int, str], fuzzy: bool = False, missing_matches: bool = False,
            empty: bool = False, multiple: bool = False) -> bool:
    """True when ``ds`` matches every key. An attribute absent from ``ds`` or empty matches only
    when ``missing_matches`` (a PACS answer that left the attribute out has already been filtered)
    or ``empty`` (Empty Value Matching, PS3.4 C.2.2.2.7). ``multiple``: a key of several values
    matches when any of them does (Multiple Value Matching, PS3.4 C.2.2.2.8)."""
    for tag, query in keys.items():
        values = _values(ds, tag)
        if values is None:
            if missing_matches or empty:
                continue
            return False
        vr = vr_of(tag)
        alternatives = split_values(query, vr) if multiple else [query]
        if not any(value_matches(vr, values, alt, fuzzy) for alt in alternatives):
            return False
    return True
