"""QIDO-RS search over a backend: relational queries as a walk down the hierarchy, re-matching,
merging duplicate matches by UID, computing missing ModalitiesInStudy / NumberOf…, paging."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from .attributes import (COMPUTED, DEFAULT_RETURN, INSTANCE, LEVEL_ATTRIBUTES, MODALITIES_IN_STUDY,
                         N_SERIES_INSTANCES, RETRIEVE_URL, SERIES, SERIES_UID, SOP_UID, STUDY, STUDY_UID,
                         UID_TAG, level_of, vr_of)
from .dicomjson import to_json
from .errors import Busy
from .matching import matches
from .query import QidoQuery

_ORDER = (STUDY, SERIES, INSTANCE)
_QR_LEVEL_TAG = 0x00080052


@dataclass
class SearchResult:
    items: list[dict]
    truncated: bool   # more matches exist than were returned (no explicit limit)
    unmatched: set[int] = field(default_factory=set)   # match keys neither the PACS nor the gateway checked
    unfilled: set[int] = field(default_factory=set)    # return keys the PACS left out and the gateway could not fill


def _returns(q: QidoQuery, level: str) -> set[int]:
    if q.include_all:
        tags = set(LEVEL_ATTRIBUTES[level])
    elif q.include_defaults:
        tags = set(DEFAULT_RETURN[level])
    else:   # includedefaults=false: what includefield names, the match keys and the UID
        tags = set()
    tags |= {t for t in q.return_keys if level_of(t, q.level) == level}
    tags |= set(q.match_at(level))
    tags.add(UID_TAG[level])
    return tags


def _dedupe(records: list[Dataset], level: str) -> list[Dataset]:
    by_uid: dict[str, Dataset] = {}
    for ds in records:
        uid = str(ds.get(UID_TAG[level]).value if UID_TAG[level] in ds else "")
        if not uid:
            continue
        kept = by_uid.get(uid)
        if kept is None:
            by_uid[uid] = ds
        else:  # fill what the first answer lacked
            for elem in ds:
                if elem.tag not in kept or kept[elem.tag].value in (None, ""):
                    kept[elem.tag] = elem
    return list(by_uid.values())


def _merge_upper(child: Dataset, parent: Dataset | None) -> Dataset:
    if parent is not None:
        for elem in parent:
            if elem.tag not in child or child[elem.tag].value in (None, ""):
                child[elem.tag] = elem
    return child


def _uid(ds: Dataset, tag: int) -> str:
    return str(ds[tag].value) if tag in ds and ds[tag].value else ""


def _missing(ds: Dataset, tag: int) -> bool:
    return tag not in ds or ds[tag].value in (None, "", [])


def _case_free(match: dict[int, str]) -> dict[int, str]:
    """What a PACS is asked with fuzzymatching: person names with every letter a ``?``, so that a
    PACS that matches case-sensitively (dcmqrscp) returns every candidate and the gateway's own
    case-insensitive matching decides."""
    return {t: "".join("?" if c.isalpha() else c for c in v) if vr_of(t) == "PN" else v
            for t, v in match.items()}


def _fill_study(backend, ds: Dataset) -> None:
    summary = backend.study_summary(_uid(ds, STUDY_UID))
    for tag, value in summary.items():
        if _missing(ds, tag):
            ds.add_new(tag, "CS" if tag == MODALITIES_IN_STUDY else "IS", value)


def search(backend, q: QidoQuery, base_url: str, max_results: int, time_limit: float = float("inf")) -> SearchResult:
    """Run the query; ``base_url`` is where this backend's ``/studies`` lives (for RetrieveURL).
    Past ``time_limit`` seconds (checked between the steps of the walk) it gives up: Busy."""
    deadline = time.monotonic() + time_limit

    def in_time() -> None:
        if time.monotonic() > deadline:
            raise Busy(f"the search took longer than limits.query_timeout ({time_limit:g} s); narrow it down")

    fuzzy, trust = q.fuzzy, backend.trusts_matching
    level_pos = _ORDER.index(q.level)
    limit = min(q.limit, max_results) if q.limit else max_results
    wanted = q.offset + limit + 1
    compute = getattr(backend, "compute_missing", True)
    filter_on_computed = MODALITIES_IN_STUDY in q.match and trust and compute
    complete = getattr(backend, "complete", None)   # keys a PACS left out, from the instances' headers
    unmatched: set[int] = set()

    def run(level: str, scope: dict[str, str], parent: Dataset | None) -> list[Dataset]:
        match = q.match_at(level)
        in_time()
        asked = _case_free(match) if fuzzy and trust else match
        if q.empty and trust:   # a PACS returns no entity whose value is empty: ask it for the values
            asked = {t: v for t, v in asked.items() if vr_of(t) == "UI"}
        records = backend.find(level, asked, _returns(q, level), scope)
        in_time()
        records = _dedupe(records, level)
        if level == STUDY and filter_on_computed:
            for ds in records:
                if _missing(ds, MODALITIES_IN_STUDY):
                    _fill_study(backend, ds)
        checked: dict[int, str] = {}
        if complete is not None and match:
            done, undone = complete(level, records, set(match), scope)
            unmatched.update(undone)
            checked = {t: v for t, v in match.items() if t in done}
            in_time()
        return [_merge_upper(ds, parent) for ds in records
                if matches(ds, match, fuzzy, missing_matches=trust, empty=q.empty, multiple=q.multiple)
                and matches(ds, checked, fuzzy, empty=q.empty, multiple=q.multiple)]

    # Walk down from the highest level the URL does not fix.
    results: list[Dataset] = []
    if q.level == STUDY:
        results = run(STUDY, {}, None)
    else:
        if q.study_uid:
            studies: list[tuple[dict, Dataset | None]] = [({STUDY: q.study_uid}, None)]
        else:
            studies = [({STUDY: _uid(s, STUDY_UID)}, s) for s in run(STUDY, {}, None)]
        for scope, parent in studies:
            if q.level == SERIES:
                results.extend(run(SERIES, scope, parent))
            else:
                if q.series_uid:
                    series_list = [({**scope, SERIES: q.series_uid}, parent)]
                else:
                    series_list = [({**scope, SERIES: _uid(se, SERIES_UID)}, se)
                                   for se in run(SERIES, scope, parent)]
                for sscope, sparent in series_list:
                    results.extend(run(INSTANCE, sscope, sparent))
                    if len(results) >= wanted:
                        break
            if len(results) >= wanted:
                break
    results = _dedupe(results, q.level)
    truncated = False
    if len(results) > q.offset + limit and (not q.limit or q.limit > max_results):
        truncated = True
    page = results[q.offset:q.offset + limit]

    # Attributes the PACS left out, for the page only.
    returns = {lvl: _returns(q, lvl) for lvl in _ORDER[:level_pos + 1]}
    unfilled: set[int] = set()
    if complete is not None and page:
        in_time()
        unfilled = complete(q.level, page, returns[q.level] - set(q.match), {k: v for k, v in
                            ((STUDY, q.study_uid), (SERIES, q.series_uid)) if v})[1]
    for ds in page if compute else []:
        in_time()
        if STUDY in returns and q.level == STUDY and returns[STUDY] & COMPUTED[STUDY]:
            if any(_missing(ds, t) for t in returns[STUDY] & COMPUTED[STUDY]):
                _fill_study(backend, ds)
        if q.level == SERIES and N_SERIES_INSTANCES in returns[SERIES] and _missing(ds, N_SERIES_INSTANCES):
            study = q.study_uid or _uid(ds, STUDY_UID)
            ds.add_new(N_SERIES_INSTANCES, "IS", backend.series_count(study, _uid(ds, SERIES_UID)))

    # Only what was asked for, plus the UIDs that place each match in the hierarchy.
    allowed: set[int] = {STUDY_UID}
    for lvl in _ORDER[:level_pos + 1]:
        fixed = (lvl == STUDY and q.study_uid) or (lvl == SERIES and q.series_uid)
        if lvl == q.level or not fixed:
            allowed |= returns[lvl]
    if q.level == INSTANCE:
        allowed.add(SERIES_UID)
    allowed.add(0x00080005)           # SpecificCharacterSet, where the source has one (below)
    allowed.discard(_QR_LEVEL_TAG)
    items = []
    for ds in page:
        study = q.study_uid or _uid(ds, STUDY_UID)
        url = f"{base_url}/studies/{study}"
        if q.level in (SERIES, INSTANCE):
            series = q.series_uid or _uid(ds, SERIES_UID)
            url += f"/series/{series}"
            if q.level == INSTANCE:
                url += f"/instances/{_uid(ds, SOP_UID)}"
        if q.level != STUDY and q.study_uid and STUDY_UID not in ds:
            ds.StudyInstanceUID = q.study_uid
        if q.level == INSTANCE and q.series_uid and SERIES_UID not in ds:
            ds.SeriesInstanceUID = q.series_uid
        obj = to_json(ds, None, None if q.include_all else allowed)
        obj.pop(f"{_QR_LEVEL_TAG:08X}", None)
        # SpecificCharacterSet stays: the JSON is UTF-8, the value names the source's character set
        # (CP-2518; Orthanc answers it too)
        obj[f"{RETRIEVE_URL:08X}"] = {"vr": "UR", "Value": [url]}
        items.append(obj)
    return SearchResult(items, truncated, unmatched, unfilled)
