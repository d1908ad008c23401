"""Put identity back on objects that return from the AI service (SEG, SR, images).

Every UID the site replaced is mapped back wherever it occurs, so references inside SEG and SR
(ReferencedSeriesSequence, ReferencedSOPInstanceUID in nested items, SourceImageSequence,
CurrentRequestedProcedureEvidenceSequence, …) point at the original instances again. UIDs the
AI service created itself (its own series and instances) are not in the map and stay as they are.
"""

from __future__ import annotations

from typing import Iterator

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from . import un
from .pseudonyms.base import PseudonymProvider, UnknownPseudonymError
from .store import SiteStore

_RECORD_ATTRS = ("PatientIdentityRemoved", "DeidentificationMethod",
                 "DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified")


class ReidentifyError(Exception):
    """The object cannot be re-identified (unknown pseudonym or domain); names no values."""


class Reidentifier:
    def __init__(self, store: SiteStore, provider: PseudonymProvider, domain: str):
        self.store = store
        self.provider = provider
        self.domain = domain
        self._uid_cache: dict[str, str | None] = {}

    def reidentify(self, ds: Dataset) -> Dataset:
        pseudonym = str(ds.get("PatientID", "") or "").strip()
        if not pseudonym:
            raise ReidentifyError("returned object has no PatientID (0010,0020)")
        patient = self.store.patient(self.domain, pseudonym)
        if patient is None:
            # pseudonyms from gPAS / TTP may have been made elsewhere: ask the provider for the ID
            try:
                original_id = self.provider.depseudonymize(self.domain, pseudonym)
            except UnknownPseudonymError:
                raise ReidentifyError(
                    f"PatientID is not a pseudonym of domain {self.domain!r}") from None
            patient = {}
        else:
            original_id = None
        pseudo_study = str(ds.get("StudyInstanceUID", "") or "")
        study = self.store.study(self.domain, pseudo_study) if pseudo_study else None

        self._map_uids(ds)
        for record in (patient, study or {}):
            if record:
                restored = Dataset.from_json(record)
                for elem in restored:
                    ds[elem.tag] = elem
        if original_id is not None:
            ds.PatientID = original_id
        for kw in _RECORD_ATTRS:
            if kw in ds:
                del ds[kw]
        ds.PatientIdentityRemoved = "NO"
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    def _original(self, uid: str) -> str | None:
        if uid not in self._uid_cache:
            self._uid_cache[uid] = self.store.original_uid(self.domain, uid)
        return self._uid_cache[uid]

    def _map_uids(self, ds: Dataset) -> None:
        for elem in uid_elements(ds):
            # set only what changes: each assignment validates the value again
            if isinstance(elem.value, (list, tuple)) or elem.VM > 1:
                mapped = [self._original(str(v)) for v in elem.value]
                if any(mapped):
                    elem.value = [m or v for m, v in zip(mapped, elem.value)]
            else:
                original = self._original(str(elem.value))
                if original:
                    elem.value = original


def uid_elements(ds: Dataset) -> Iterator[DataElement]:
    """Every UID element with a value, in `ds` and all its sequence items, converted in place.

    Elements stored as UN are read as sequences where they are ones (`un.resolve`). Walks the
    raw elements: converting every value (a SEG has thousands of per-frame numbers)
    costs more than the walk; only sequences and UIDs need converting, and only sequences that
    can hold a UID (`_may_hold_uid`): what stays raw is later encoded by copying its bytes."""
    for raw in list(ds.elements()):
        vr = raw.VR
        if vr is None or vr == "UN":      # implicit VR, or UN: a sequence stored as UN is parsed
            vr = un.value_vr(ds, raw.tag)
        if vr == "SQ":
            if not _may_hold_uid(raw):
                continue
            for item in ds[raw.tag].value or ():
                yield from uid_elements(item)
        elif vr == "UI":
            elem = ds[raw.tag]
            if elem.value:
                yield elem


def _may_hold_uid(raw: DataElement | RawDataElement) -> bool:
    """False only for a still-raw explicit VR sequence whose bytes spell neither "UI" nor "UN":
    in explicit VR every nested element writes its VR, so such a sequence has no UID element (an
    undefined-length UN inside is read as an implicit VR sequence, whose UIDs name no VR)."""
    if not isinstance(raw, RawDataElement) or raw.VR != "SQ" or not isinstance(raw.value, bytes):
        return True
    return b"UI" in raw.value or b"UN" in raw.value
