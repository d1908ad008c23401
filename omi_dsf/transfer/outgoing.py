"""What the send step may let leave the site: the pseudonymize step's output, leak-checked whole.

The instances are read from where the pseudonymize step says it put them (its output
pseudonymized-study-location: a folder, or a DICOMweb store's …/studies, read by WADO-RS with the
TLS settings of `steps.pseudonymization.sink` and spooled to a temporary folder). Before the first byte leaves, every instance
is checked against the study's identifying values as the site store knows them: the patient and
study attributes de-identification removed (names, IDs, birth date, accession number, …) and the
original UIDs behind every pseudonymized UID in the study. One hit stops the whole send.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import pydicom
from pydicom.dataset import Dataset

from omi_dsf.deid import instance_io
from omi_dsf.deid.config import InstanceIoSettings, PseudonymizationSettings
from omi_dsf.deid.identity import Identity
from omi_dsf.deid.leakcheck import LeakError, bytes_may_leak, check_flags, codec_of, encoded_hits, text_of
from omi_dsf.deid.reidentify import uid_elements
from omi_dsf.deid.store import SiteStore
from omi_dsf.transfer.errors import TransferError


@dataclass
class OutgoingStudy:
    pseudo_study_uid: str
    files: list[Path] = field(default_factory=list)      # Part 10 files, in instance order
    sop_uids: list[str] = field(default_factory=list)
    bytes: int = 0
    _spool: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        if self._spool is not None:
            self._spool.cleanup()
            self._spool = None


def _uid_values(ds: Dataset) -> Iterator[str]:
    for elem in uid_elements(ds):
        values = elem.value if isinstance(elem.value, (list, tuple)) or elem.VM > 1 else [elem.value]
        yield from (str(v).strip("\x00 ") for v in values)


def identity_from_store(store: SiteStore, domain: str, pseudonym: str, pseudo_study_uid: str) -> Identity:
    """The study's identifying values as far as the site kept them (UIDs are added per instance)."""
    identity = Identity()
    for record in (store.patient(domain, pseudonym), store.study(domain, pseudo_study_uid)):
        if record:
            identity.add_dataset(Dataset.from_json(record))
    return identity


def _read(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise TransferError(f"a de-identified instance is unreadable ({type(exc).__name__})") from None


def _pixel_range(ds: Dataset) -> tuple[int, int] | None:
    """Where the pixel samples are in the file (the leak check skips them), or None."""
    if 0x7FE00010 not in ds:
        return None
    pixels = ds.get_item(0x7FE00010)
    tell = getattr(pixels, "value_tell", None)
    if not tell or not isinstance(pixels.value, (bytes, bytearray)):
        return None
    return tell, tell + len(pixels.value)


def _searchable_bytes(data: bytes, skip: tuple[int, int] | None) -> bytes:
    """The encoded bytes without the pixel samples (the leak check's fast path)."""
    return data if skip is None else data[:skip[0]] + data[skip[1]:]  # elements after the pixels count too


def _spool_from_dicomweb(sink: InstanceIoSettings, params: Mapping[str, Any], study: OutgoingStudy) -> None:
    study._spool = tempfile.TemporaryDirectory(prefix="omi-send-")
    source = instance_io.open_source(sink, params)
    for n, (_, data) in enumerate(source, 1):   # Part 10 bytes as stored: checked as they are
        target = Path(study._spool.name) / f"{n:06d}.dcm"
        target.write_bytes(data)
        study.files.append(target)


def collect(pseudo_cfg: PseudonymizationSettings, store: SiteStore, pseudo_study_uid: str,
            location: str) -> OutgoingStudy:
    """The de-identified instances of the study at `location` (the pseudonymize step's
    pseudonymized-study-location), each checked; TransferError on the first leak."""
    domain = pseudo_cfg.domain
    if store.original_uid(domain, pseudo_study_uid) is None:
        raise TransferError("the study was not pseudonymized at this site (its UID is not in the site store)")
    sink = pseudo_cfg.sink or InstanceIoSettings.model_construct(kind="folder")
    study = OutgoingStudy(pseudo_study_uid)
    try:
        if sink.kind == "folder":
            folder = Path(location)
            candidates = sorted(p for p in folder.glob("*.dcm")) if folder.is_dir() else []
        elif sink.kind == "dicomweb":
            base = location[: -len("/studies")] if location.endswith("/studies") else location
            _spool_from_dicomweb(sink.model_copy(update={"url": base}), {"study_uid": pseudo_study_uid}, study)
            candidates, study.files = study.files, []
        else:
            raise TransferError(f"send cannot read instances from a pseudonymization sink of kind {sink.kind!r}")
        _check_all(candidates, store, domain, pseudo_study_uid, study)
    except BaseException:
        study.close()
        raise
    if not study.files:
        raise TransferError("no de-identified instances of the study found where the pseudonymize step wrote them")
    return study


@dataclass
class _Checked:
    """What pass 2 needs of an instance read in pass 1; the dataset itself is not kept."""
    path: Path
    number: int
    skip: tuple[int, int] | None  # where the pixel samples are
    searchable: bytes            # the file without its pixel samples
    codec: str | None            # how to decode `searchable`; None: walk the elements
    sop_uid: str


def _check_all(candidates: list[Path], store: SiteStore, domain: str, pseudo_study_uid: str,
               study: OutgoingStudy) -> None:
    # Pass 1 reads each file once: which files belong to the study, and every original UID
    # behind them, so that an original UID of instance 7 is caught in instance 2 as well.
    mine: list[_Checked] = []
    originals: set[str] = set()
    seen: set[str] = set()
    pseudonym = None
    for path in candidates:
        data = path.read_bytes()
        ds = _read(data)
        if text_of(ds, 0x0020000D) != pseudo_study_uid:
            continue  # another study in a shared outbox folder
        n = len(mine) + 1
        if pseudonym is None:
            pseudonym = text_of(ds, 0x00100020)
        elif text_of(ds, 0x00100020) != pseudonym:
            raise TransferError(f"leak check stopped the send: instance {n} has another PatientID than the "
                            "study's pseudonym")
        try:
            check_flags(ds)
        except LeakError as exc:
            exc.locate(f"instance {n}", text_of(ds, 0x00080018))
            raise TransferError(f"leak check stopped the send: {exc}") from None
        for uid in set(_uid_values(ds)) - seen:   # study and series UIDs repeat in every instance
            seen.add(uid)
            original = store.original_uid(domain, uid)
            if original:
                originals.add(original)
        skip = _pixel_range(ds)
        mine.append(_Checked(path, n, skip, _searchable_bytes(data, skip), codec_of(ds), text_of(ds, 0x00080018)))
        study.sop_uids.append(text_of(ds, 0x00080018))
        study.bytes += len(data)
    if not mine:
        return
    if not pseudonym or store.patient(domain, pseudonym) is None:
        # without the patient's record we would not know the values to look for: refuse
        raise TransferError("leak check stopped the send: the instances' PatientID is not a pseudonym this site "
                        "issued in this domain")
    identity = identity_from_store(store, domain, pseudonym, pseudo_study_uid)
    identity.add_uids(originals)
    # Pass 2: the leak check on every object as it will be sent, before anything is sent. The
    # bytes search is a superset of the element-wise one; only where it finds something (or
    # cannot decide) is the file read again and walked, to confirm and name the attribute; a
    # find that no element explains refuses the instance too (leakcheck.encoded_hits).
    for item in mine:
        if bytes_may_leak(item.searchable, item.codec, identity):
            hits = encoded_hits(item.path.read_bytes(), identity, item.codec, item.skip)
            if hits:  # names attribute, rule and kind, never the value
                exc = LeakError(hits=hits).locate(f"instance {item.number}", item.sop_uid)
                raise TransferError(f"leak check stopped the send: {exc}")
        study.files.append(item.path)
