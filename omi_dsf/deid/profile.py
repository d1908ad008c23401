"""PS3.15 Table E.1-1 as data, and the action each attribute gets under a set of options.

The table itself lives in `table_e1_1.tsv` beside this module (one row per attribute of the
standard's table); this module only reads it and resolves the combined actions.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from pydicom.dataset import Dataset
from pydicom.tag import Tag

# The options we implement; the name is the TSV column, the value is the CID 7050 code.
OPTION_CODES: dict[str, tuple[str, str]] = {
    "rtn_long_modif_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "rtn_pat_chars": ("113108", "Retain Patient Characteristics Option"),
    "rtn_dev_id": ("113109", "Retain Device Identity Option"),
    "clean_desc": ("113105", "Clean Descriptors Option"),
    "rtn_safe_priv": ("113111", "Retain Safe Private Option"),
}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")

# Command-line spelling of each option.
OPTION_NAMES: dict[str, str] = {
    "retain-modified-dates": "rtn_long_modif_dates",
    "retain-patient-characteristics": "rtn_pat_chars",
    "retain-device-identity": "rtn_dev_id",
    "clean-descriptors": "clean_desc",
    "retain-safe-private": "rtn_safe_priv",
}

# Attributes that a combined action must not remove or empty because IODs we send or receive
# (CT/MR images, SEG, SR) have them as Type 1: there the "D" branch applies. We do not carry
# the full IOD module tables, so this is the short list that matters for those IODs.
_TYPE1_IN_OUR_IODS = {
    Tag("ContentDate"), Tag("ContentTime"),            # Type 1 in SEG / SR (Enhanced / SR Document)
    Tag("DeviceSerialNumber"),                         # Type 1 in Enhanced General Equipment (SEG)
}


def dcm_code(code: str, meaning: str) -> Dataset:
    """One item of De-identification Method Code Sequence (DCM, CID 7050)."""
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


class UnknownOptionError(ValueError):
    """An option name that this profile does not implement."""


@dataclass(frozen=True)
class Rule:
    tag: str          # "0010,0010", or a pattern like "60xx,3000"
    keyword: str
    name: str
    basic: str
    options: dict[str, str]


def parse_options(names: list[str] | tuple[str, ...] | set[str]) -> frozenset[str]:
    """Map option names (CLI spelling or TSV column) to TSV columns; reject unknown ones."""
    out = set()
    for name in names:
        key = name.strip()
        if not key:
            continue
        col = OPTION_NAMES.get(key, key if key in OPTION_CODES else None)
        if col is None:
            raise UnknownOptionError(
                f"unknown de-identification option {key!r}; known: {', '.join(sorted(OPTION_NAMES))}")
        out.add(col)
    return frozenset(out)


@lru_cache(maxsize=1)
def rules() -> tuple[Rule, ...]:
    text = resources.files(__package__).joinpath("table_e1_1.tsv").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    reader = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    out = []
    for row in reader:
        opts = {k: v for k, v in row.items() if k in _OPTION_COLUMNS and v}
        out.append(Rule(row["tag"], row["keyword"], row["name"], row["basic"], opts))
    return tuple(out)


_OPTION_COLUMNS = {"rtn_safe_priv", "rtn_uids", "rtn_dev_id", "rtn_inst_id", "rtn_pat_chars",
                   "rtn_long_full_dates", "rtn_long_modif_dates", "clean_desc", "clean_struct_cont",
                   "clean_graph"}


def resolve(rule: Rule, options: frozenset[str], tag: int | None = None) -> str:
    """The one action (D, Z, X, K, C or U) this attribute gets under these options.

    Where two enabled options disagree (e.g. a calibration date: Retain Device Identity says K,
    Retain Modified Dates says C), C wins: a shifted date or a cleaned text is the safer one.
    """
    chosen = [rule.options[o] for o in options if o in rule.options]
    if "C" in chosen:
        return "C"
    if "K" in chosen:
        return "K"
    action = rule.basic
    if "/" not in action:
        return action
    if action == "X/Z/U*":
        # Keep the reference sequence but replace every UID inside it: the references stay
        # valid within the pseudonymized study, and nothing in them identifies the patient.
        return "U"
    if tag is not None and tag in _TYPE1_IN_OUR_IODS and "D" in action:
        return "D"
    if action == "Z/D":
        return "Z"
    return "X"  # X/Z, X/D, X/Z/D: the attribute is Type 3 in the IODs we handle


@lru_cache(maxsize=8)
def action_table(options: frozenset[str]) -> tuple[dict[int, str], dict[str, str]]:
    """(exact tag -> action, pattern -> action) for these options.

    Patterns are the repeating groups (50xx curves, 60xx overlays) and the private row.
    """
    exact: dict[int, str] = {}
    patterns: dict[str, str] = {}
    for rule in rules():
        if "x" in rule.tag or rule.tag.startswith("gggg"):
            patterns[rule.tag] = resolve(rule, options)
            continue
        tag = int(rule.tag.replace(",", ""), 16)
        exact[tag] = resolve(rule, options, Tag(tag))
    return exact, patterns
