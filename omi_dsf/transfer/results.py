"""Fetch the AI results (SEG, SR) from the provider's gateway and put the patient's identity back.

Only the result series are fetched (QIDO-RS for the series of the result study whose modality is
one of `return.modalities`, default SEG and SR), not the images we sent. Every object must carry
the pseudonym and the pseudonymized study UID of this request; anything else is refused before
it is re-identified, so results of another patient or another study can never land in the PACS.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

import pydicom
from pydicom.dataset import Dataset

from omi_dsf.deid.reidentify import Reidentifier, ReidentifyError
from omi_dsf.dicomweb_client import BadAnswer, DicomwebError, DicomwebRefused
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.provider import ProviderGateway
from omi_dsf.transfer.stow import GatewayBusy, as_transfer_error, first_value

MODALITY, SERIES_UID = "00080060", "0020000E"
RESULT_MODALITIES = ("SEG", "SR")


@dataclass
class Results:
    datasets: list[Dataset] = field(default_factory=list)
    series_uids: list[str] = field(default_factory=list)
    bytes: int = 0


def result_series(gw: ProviderGateway, study_uid: str, modalities: Sequence[str]) -> list[str]:
    what = "QIDO-RS search of the result study"
    try:
        found = gw.translated(gw.dicomweb.search_for_series, study_uid, fields=[MODALITY, SERIES_UID])
    except DicomwebRefused as exc:
        if exc.status == 404:
            raise TransferError("the result study is not at the provider's gateway") from None
        raise as_transfer_error(exc, what) from None
    except DicomwebError as exc:
        raise as_transfer_error(exc, what) from None
    if not found:
        raise TransferError("the result study is not at the provider's gateway")
    series = [(str(first_value(s, MODALITY) or ""), str(first_value(s, SERIES_UID) or "")) for s in found]
    found_uids = [uid for modality, uid in series if modality in modalities and uid]
    if not found_uids:
        raise TransferError(f"the result study at the provider's gateway has no {' or '.join(modalities)} series")
    return found_uids


def _retrieve_series(gw: ProviderGateway, study_uid: str, series_uid: str) -> list[bytes]:
    try:
        return gw.translated(gw.dicomweb.retrieve_series, study_uid, series_uid)
    except DicomwebRefused as exc:
        if exc.status == 404:
            raise TransferError("a result series listed by the provider's gateway cannot be retrieved (HTTP 404)") \
                from None
        raise as_transfer_error(exc, "WADO-RS retrieve of a result series") from None
    except BadAnswer:
        raise GatewayBusy("WADO-RS answer from the provider's gateway is not a complete multipart body") from None
    except DicomwebError as exc:
        raise as_transfer_error(exc, "WADO-RS retrieve of a result series") from None


def fetch_results(gw: ProviderGateway, study_uid: str, pseudonym: str,
                  modalities: Sequence[str] = RESULT_MODALITIES) -> Results:
    out = Results()
    for series_uid in result_series(gw, study_uid, modalities):
        for data in _retrieve_series(gw, study_uid, series_uid):
            try:
                ds = pydicom.dcmread(io.BytesIO(data))
            except Exception as exc:
                raise TransferError(f"a result object from the provider is not DICOM ({type(exc).__name__})") from None
            if str(ds.get("StudyInstanceUID", "")) != study_uid:
                raise TransferError("a result object belongs to another study than the one this request sent")
            if str(ds.get("PatientID", "") or "").strip() != pseudonym:
                raise TransferError("a result object carries another PatientID than this request's pseudonym")
            out.datasets.append(ds)
            out.bytes += len(data)
        out.series_uids.append(series_uid)
    return out


def reidentify_all(datasets: list[Dataset], reid: Reidentifier, patient_id: str, study_uid: str) -> None:
    """Re-identify in place and check that each object now belongs to the requested patient and study."""
    for n, ds in enumerate(datasets, 1):
        try:
            reid.reidentify(ds)
        except ReidentifyError as exc:
            raise TransferError(f"result object {n}: {exc}") from None
        if patient_id and str(ds.get("PatientID", "")) != patient_id:
            raise TransferError(f"result object {n}: after re-identification its PatientID is not the requested "
                            "patient's")
        if str(ds.get("StudyInstanceUID", "")) != study_uid:
            raise TransferError(f"result object {n}: after re-identification it is not in the requested study")
