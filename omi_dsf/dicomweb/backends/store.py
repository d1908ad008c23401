"""The embedded DICOM store: Part 10 files on disk and an SQLite index (the provider's inbox/outbox).

Layout under ``path``: ``index.sqlite`` and ``files/<study>/<series>/<sop>.dcm``. The index keeps,
per instance, the study/series/instance attributes as DICOM JSON, so queries never open files.
A file is written to a temporary name and renamed before it is indexed: a crash leaves no
half-written instance behind. Storing an instance again into the same study and series (and for
the same patient) replaces it (idempotent senders); a SOP Instance UID already stored under
another study, series or patient is refused (``INSTANCE_CONFLICT``), never moved. A study whose
upload broke off is noted (``uploads``) until a later upload of it completes.
The gateway's worker processes share one store: SQLite's locks order their writes (each index
transaction takes the write lock first), and temporary names carry the process id.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from omi_dsf.database import connect_sqlite

from ..attributes import (INSTANCE, LEVEL_ATTRIBUTES, MODALITIES_IN_STUDY, N_SERIES_INSTANCES, N_STUDY_INSTANCES,
                          N_STUDY_SERIES, SERIES, SERIES_UID, SOP_UID, STUDY, STUDY_UID, level_of)
from ..config import StoreBackendConfig
from ..dicomjson import from_json, to_json
from ..errors import NotFound
from ..query import is_uid, split_uid_list
from ..stream import CancelToken

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    modality TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    study_json TEXT NOT NULL,
    series_json TEXT NOT NULL,
    instance_json TEXT NOT NULL,
    stored_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS by_series ON instances (study_uid, series_uid);
CREATE TABLE IF NOT EXISTS incomplete (
    study_uid TEXT PRIMARY KEY,
    since REAL NOT NULL,
    reason TEXT NOT NULL
);
"""

PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000
INSTANCE_CONFLICT = 0xA770   # STOW-RS Failure Reason: the SOP Instance UID belongs to another study/patient
PATIENT_ID = "00100020"
CHARSET = "00080005"   # SpecificCharacterSet
_TMP_NAMES = itertools.count()


# Shared and Per-frame Functional Groups: a multi-frame object's description of every frame (a
# 200-slice SEG: 400 items, 0.4 MB of JSON). Never a query key; WADO-RS metadata, read from the
# file, still has them.
FRAME_DESCRIPTIONS = {0x52009229, 0x52009230}


def split_levels(ds: Dataset) -> tuple[dict, dict, dict]:
    """The dataset's top-level attributes as three DICOM JSON objects, one per query level."""
    # one conversion, then split: converting per level walked (and decoded) the dataset 3 times
    levels: dict[str, dict] = {STUDY: {}, SERIES: {}, INSTANCE: {}}
    indexed = {int(e.tag) for e in ds.elements()} - FRAME_DESCRIPTIONS
    for key, value in to_json(ds, None, indexed).items():
        levels[level_of(int(key, 16), INSTANCE)][key] = value
    for lvl, tags in ((SERIES, (STUDY_UID,)), (INSTANCE, (STUDY_UID, SERIES_UID))):
        for tag in tags:
            key = f"{tag:08X}"
            if key in levels[STUDY] or key in levels[SERIES]:
                levels[lvl][key] = levels[STUDY].get(key) or levels[SERIES][key]
    if CHARSET in levels[INSTANCE]:   # every level's match names the character set its source was in
        levels[STUDY][CHARSET] = levels[SERIES][CHARSET] = levels[INSTANCE][CHARSET]
    return levels[STUDY], levels[SERIES], levels[INSTANCE]


class StoreBackend:
    trusts_matching = False   # we match ourselves: an absent attribute does not match (but
                              # for Empty Value Matching)

    def __init__(self, cfg: StoreBackendConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.root = Path(cfg.path)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = connect_sqlite(self.root / "index.sqlite")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: list) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- queries -------------------------------------------------------------------------------
    @staticmethod
    def _where(level: str, match: dict[int, str], scope: dict[str, str]) -> tuple[str, list]:
        clauses, args = [], []
        for lvl, col in ((STUDY, "study_uid"), (SERIES, "series_uid"), (INSTANCE, "sop_uid")):
            if lvl in scope:
                clauses.append(f"{col} = ?")
                args.append(scope[lvl])
        uid_tag = {STUDY: STUDY_UID, SERIES: SERIES_UID, INSTANCE: SOP_UID}[level]
        if uid_tag in match:
            uids = split_uid_list(match[uid_tag])
            col = {STUDY: "study_uid", SERIES: "series_uid", INSTANCE: "sop_uid"}[level]
            clauses.append(f"{col} IN ({','.join('?' * len(uids))})")
            args.extend(uids)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def find(self, level: str, match: dict[int, str], returns: set[int], scope: dict[str, str]) -> list[Dataset]:
        where, args = self._where(level, match, scope)
        out: list[Dataset] = []
        # Decode only what the query returns or matches: a stored header has ~100 attributes and
        # decoding all of them for each of a study's instances dominated QIDO. includefield=all
        # (every attribute of the level asked for) still gets everything the store has.
        keys = None if set(LEVEL_ATTRIBUTES[level]) <= returns else {f"{t:08X}" for t in returns | set(match) | {STUDY_UID, SERIES_UID, SOP_UID}} | {CHARSET}

        def load(text: str) -> Dataset:
            obj = json.loads(text)
            return from_json(obj if keys is None else {k: v for k, v in obj.items() if k in keys})

        if level == STUDY:
            rows = self._rows(
                "SELECT study_json, COUNT(*), COUNT(DISTINCT series_uid), GROUP_CONCAT(DISTINCT modality) "
                f"FROM instances{where} GROUP BY study_uid ORDER BY MIN(stored_at)", args)
            for study_json, n_inst, n_series, modalities in rows:
                ds = load(study_json)
                ds.add_new(MODALITIES_IN_STUDY, "CS", sorted(set((modalities or "").split(",")) - {""}))
                ds.add_new(N_STUDY_SERIES, "IS", n_series)
                ds.add_new(N_STUDY_INSTANCES, "IS", n_inst)
                out.append(ds)
        elif level == SERIES:
            rows = self._rows(f"SELECT series_json, COUNT(*) FROM instances{where} "
                              "GROUP BY study_uid, series_uid ORDER BY MIN(stored_at)", args)
            for series_json, n_inst in rows:
                ds = load(series_json)
                ds.add_new(N_SERIES_INSTANCES, "IS", n_inst)
                out.append(ds)
        else:
            rows = self._rows(f"SELECT instance_json FROM instances{where} ORDER BY stored_at", args)
            out = [load(r[0]) for r in rows]
        return out

    def study_summary(self, study: str) -> dict[int, object]:
        ds = self.find(STUDY, {}, set(), {STUDY: study})
        if not ds:
            return {}
        return {t: ds[0][t].value for t in (MODALITIES_IN_STUDY, N_STUDY_SERIES, N_STUDY_INSTANCES)}

    def series_count(self, study: str, series: str) -> int:
        return self._rows("SELECT COUNT(*) FROM instances WHERE study_uid=? AND series_uid=?",
                          [study, series])[0][0]

    # -- retrieval -----------------------------------------------------------------------------
    def _paths(self, scope: dict[str, str]) -> list[str]:
        where, args = self._where(INSTANCE, {}, scope)
        return [r[0] for r in self._rows(f"SELECT path FROM instances{where} "
                                         "ORDER BY series_uid, stored_at", args)]

    def retrieve(self, level: str, scope: dict[str, str], emit, token: CancelToken, head=None) -> None:
        paths = self._paths(scope)
        if not paths:
            raise NotFound(f"no such {level} in store {self.name}")
        for rel in paths:
            if token.cancelled:
                return
            data = (self.root / rel).read_bytes()
            emit(data if head is None else head() + data)

    def instance(self, study: str, series: str, sop: str) -> bytes:
        paths = self._paths({STUDY: study, SERIES: series, INSTANCE: sop})
        if not paths:
            raise NotFound("no such instance")
        return (self.root / paths[0]).read_bytes()

    # -- storage -------------------------------------------------------------------------------
    def _prepare(self, data: bytes, ds: Dataset | None = None) -> tuple[int, str, list | None, Path | None]:
        """Write one instance to a temporary file; its index row, or the failure status and reason.

        ``ds``: the instance's header if the caller has already parsed it (STOW-RS has).
        """
        try:
            ds = ds if ds is not None else dcmread(BytesIO(data), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - whatever pydicom makes of untrusted bytes
            return CANNOT_UNDERSTAND, f"not a DICOM Part 10 file ({type(exc).__name__})", None, None
        study, series, sop = (str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                              "SOPInstanceUID"))
        sop_class = str(ds.get("SOPClassUID", ""))
        for what, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                          ("SOPInstanceUID", sop), ("SOPClassUID", sop_class)):
            if not is_uid(uid):
                return CANNOT_UNDERSTAND, f"{what} missing or invalid", None, None
        ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
        rel = f"files/{study}/{series}/{sop}.dcm"
        target = self.root / rel
        try:
            study_json, series_json, instance_json = split_levels(ds)
        except Exception as exc:  # noqa: BLE001 - an attribute pydicom cannot convert
            return CANNOT_UNDERSTAND, f"attributes cannot be read ({type(exc).__name__})", None, None
        with self._lock:   # checked again before the rename; this spares writing a refused file
            conflict = self._conflict(sop, study, series, study_json)
        if conflict:
            return INSTANCE_CONFLICT, conflict, None, None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}.{next(_TMP_NAMES)}")   # unique: one SOP may come twice
            tmp.write_bytes(data)
        except OSError as exc:
            return PROCESSING_FAILURE, f"could not write: {exc.strerror}", None, None
        return 0x0000, "", [sop, study, series, sop_class, ts, str(ds.get("Modality", "") or ""), rel, len(data),
                            json.dumps(study_json), json.dumps(series_json), json.dumps(instance_json),
                            time.time()], tmp

    def _conflict(self, sop: str, study: str, series: str, study_json: dict) -> str | None:
        """Why this SOP Instance UID may not be stored here, or None (new, or the same place).
        The caller holds the lock."""
        row = self._db.execute("SELECT study_uid, series_uid, study_json FROM instances WHERE sop_uid = ?",
                               [sop]).fetchone()
        if row is None:
            return None
        if row[0] != study:
            return "SOP Instance UID already stored in another study"
        if row[1] != series:
            return "SOP Instance UID already stored in another series"
        stored = json.loads(row[2]).get(PATIENT_ID, {}).get("Value")
        if stored != study_json.get(PATIENT_ID, {}).get("Value"):
            return "SOP Instance UID already stored for another patient"
        return None

    def _index(self, prepared: list[list]) -> list[str | None]:
        """Rename and index the prepared instances in one transaction (a commit per instance
        costs a WAL sync each); a conflict that arose meanwhile refuses that instance."""
        outcome: list[str | None] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")   # the write lock first: other worker processes wait
            try:
                for row, tmp in prepared:
                    conflict = self._conflict(row[0], row[1], row[2], json.loads(row[8]))
                    if conflict:
                        tmp.unlink(missing_ok=True)
                    else:
                        os.replace(tmp, self.root / row[6])
                        self._db.execute("INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row)
                    outcome.append(conflict)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return outcome

    def store(self, items: list[tuple[str, str, str, bytes]], study_uids: set[str],
              headers: list[Dataset] | None = None) -> list[tuple[int, str]]:
        """Write and index the instances; ``headers`` (their parsed headers, if any) spares a re-parse."""
        written = [self._prepare(data, ds) for (_, _, _, data), ds in zip(items, headers or [None] * len(items))]
        ready = [(row, tmp) for _, _, row, tmp in written if row]
        results = [(status, comment) for status, comment, _, _ in written]
        if ready:
            try:
                conflicts = iter(self._index(ready))
            except (sqlite3.Error, OSError) as exc:
                for _, tmp in ready:
                    tmp.unlink(missing_ok=True)
                return [(PROCESSING_FAILURE, f"could not index: {type(exc).__name__}") if row else result
                        for result, (_, _, row, _) in zip(results, written)]
            for i, (_, _, row, _) in enumerate(written):
                if row:
                    conflict = next(conflicts)
                    results[i] = (INSTANCE_CONFLICT, conflict) if conflict else (0x0000, "")
        return results

    # -- uploads that broke off ------------------------------------------------------------------
    def note_upload(self, studies: set[str], broke_off: str | None) -> None:
        """After a STOW-RS: ``broke_off`` (why) marks the studies incomplete; None (the body
        arrived whole) clears the mark."""
        with self._lock:
            if broke_off:
                self._db.executemany("INSERT OR REPLACE INTO incomplete VALUES (?,?,?)",
                                     [(s, time.time(), broke_off[:200]) for s in studies])
            else:
                self._db.executemany("DELETE FROM incomplete WHERE study_uid = ?", [(s,) for s in studies])

    def incomplete(self, studies: set[str]) -> dict[str, str]:
        """The studies among ``studies`` whose last upload broke off, with the reason."""
        if not studies:
            return {}
        wanted = sorted(studies)[:1000]
        return dict(self._rows(f"SELECT study_uid, reason FROM incomplete WHERE study_uid IN "
                               f"({','.join('?' * len(wanted))})", wanted))
