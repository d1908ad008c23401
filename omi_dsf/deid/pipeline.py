"""Stream a study through de-identification and the leak check, one instance at a time."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Union

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .deidentify import Deidentifier
from .encode import encode_part10 as _encode
from .identity import Identity
from .leakcheck import PIXEL_TAGS, check_outgoing, text_of
from .pseudonyms.base import PseudonymProvider
from .store import SiteStore

Instance = Union[Dataset, bytes, str, os.PathLike]
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


class DeidError(Exception):
    """Bad input: names the file (or instance number) and what is wrong with it."""


@dataclass
class StudyResult:
    pseudonym: str = ""
    study_uids: dict[str, str] = field(default_factory=dict)   # original -> pseudonymized
    instances: int = 0
    bytes_in: int = 0

    @property
    def pseudo_study_uid(self) -> str:
        return next(iter(self.study_uids.values()), "")


def read_instance(item: Instance, name: str) -> Dataset:
    """Read one instance; a non-DICOM or truncated input is a DeidError naming it."""
    if isinstance(item, Dataset):
        return item
    try:
        src = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item
        ds = pydicom.dcmread(src)
    except InvalidDicomError:
        raise DeidError(f"{name}: not a DICOM file (no DICM preamble)") from None
    except FileNotFoundError:
        raise DeidError(f"{name}: no such file") from None
    except Exception as exc:  # pydicom raises many kinds on cut-off files
        raise DeidError(f"{name}: unreadable DICOM ({type(exc).__name__}); truncated or corrupt") from None
    _check_complete(ds, name)
    return ds


def _us(ds: Dataset, tag: int, default: int | None = None) -> int:
    if tag not in ds:
        if default is None:
            raise AttributeError(tag)
        return default
    raw = ds.get_item(tag)
    if isinstance(raw.value, (bytes, bytearray)) and raw.VR == "US" and len(raw.value) >= 2:
        return int.from_bytes(raw.value[:2], "little" if raw.is_little_endian else "big")
    return int(ds[tag].value)


def _check_complete(ds: Dataset, name: str) -> None:
    meta = getattr(ds, "file_meta", None)
    ts = text_of(meta, 0x00020010) if meta is not None else ""
    if 0x7FE00010 not in ds or ts not in _UNCOMPRESSED:
        return
    try:
        frames = int(text_of(ds, 0x00280008) or 1)
        expected = (_us(ds, 0x00280010) * _us(ds, 0x00280011) * frames
                    * _us(ds, 0x00280002, 1) * _us(ds, 0x00280100) // 8)
    except (AttributeError, TypeError, ValueError):
        raise DeidError(f"{name}: pixel data without a usable image description") from None
    have = len(ds.get_item(0x7FE00010).value or b"")  # raw: no need to decode the pixels
    if have < expected:
        raise DeidError(f"{name}: truncated: PixelData has {have} of {expected} bytes")


@dataclass
class Outgoing:
    """A de-identified instance that passed the leak check, and its Part 10 bytes as checked."""
    dataset: Dataset
    data: bytes


def encode_part10(ds: Dataset) -> tuple[bytes, int]:
    """(Part 10 bytes, offset where the pixel data start): the leak check reads what precedes it."""
    return _encode(ds, PIXEL_TAGS)


class StudyPseudonymizer:
    """De-identify instances of one patient's study(ies); yields datasets that passed the leak check.

    Before the first instance leaves, the UID map and the removed patient/study attributes are
    stored at the site, so anything returned can be re-identified.
    """

    def __init__(self, *, key: bytes, domain: str, provider: PseudonymProvider, store: SiteStore,
                 options=(), expect_patient_id: str | None = None, expect_study_uid: str | None = None):
        self.deid = Deidentifier(key, domain, options)
        self.domain = domain
        self.provider = provider
        self.store = store
        self.expect_patient_id = expect_patient_id
        self.expect_study_uid = expect_study_uid
        self.identity = Identity()
        self.result = StudyResult()
        self._patient_id: str | None = None
        self._stored_studies: set[str] = set()

    def process(self, instances: Iterable[tuple[str, Instance]]) -> Iterator[Outgoing]:
        """One instance at a time: read, de-identify, encode, leak-check; nothing is buffered."""
        for name, item in instances:
            yield self.process_encoded(item, name)

    def process_one(self, item: Instance, name: str = "instance") -> Dataset:
        return self.process_encoded(item, name).dataset

    def process_encoded(self, item: Instance, name: str = "instance") -> Outgoing:
        size = len(item) if isinstance(item, (bytes, bytearray)) else (
            Path(item).stat().st_size if isinstance(item, (str, os.PathLike)) and Path(item).exists() else 0)
        ds = read_instance(item, name)
        patient_id = text_of(ds, 0x00100020)
        if not patient_id:
            raise DeidError(f"{name}: missing PatientID (0010,0020)")
        if self.expect_patient_id is not None and patient_id != self.expect_patient_id:
            raise DeidError(f"{name}: PatientID does not match the requested patient")
        if self._patient_id is None:
            self._patient_id = patient_id
            self.result.pseudonym = self.provider.pseudonymize(self.domain, patient_id)
        elif patient_id != self._patient_id:
            raise DeidError(f"{name}: instances of more than one patient in one study")
        study_uid = text_of(ds, 0x0020000D)
        if not study_uid or not text_of(ds, 0x00080018):
            raise DeidError(f"{name}: missing StudyInstanceUID or SOPInstanceUID")
        if self.expect_study_uid and study_uid != self.expect_study_uid:
            raise DeidError(f"{name}: StudyInstanceUID does not match the requested study")

        pseudonym = self.result.pseudonym
        self.identity.add_dataset(ds)
        if study_uid not in self._stored_studies:
            pseudo_study = self.deid.map_uid(study_uid)
            self.store.put_patient(self.domain, pseudonym, self.deid.patient_record(ds))
            self.store.put_study(self.domain, pseudo_study, self.deid.study_record(ds))
            self.result.study_uids[study_uid] = pseudo_study
            self._stored_studies.add(study_uid)

        self.deid.deidentify(ds, pseudonym, self.identity)
        self.identity.add_uids(self.deid.new_uids.values())
        # the map must be at the site before the instance can leave it
        self.store.put_uids(self.domain, self.deid.new_uids)
        self.deid.new_uids = {}
        data, header_end = encode_part10(ds)
        check_outgoing(ds, self.identity, encoded_header=data[:header_end])
        self.result.instances += 1
        self.result.bytes_in += size
        return Outgoing(ds, data)
