"""Stream a study through de-identification and the leak check, one instance at a time."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Union

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from .deidentify import Deidentifier, uid_for
from .encode import encode_part10 as _encode
from .identity import Identity
from . import pixels
from .leakcheck import (PIXEL_TAGS, RULE_BURNED_IN, LeakError, burned_in_problem, check_flags, codec_of,
                        encoded_hits, text_of)
from .pseudonyms.base import PseudonymProvider
from .refusal import POLICIES, Refused
from .store import SiteStore

Instance = Union[Dataset, bytes, str, os.PathLike]
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


class DeidError(Refused):
    """Bad input: names the file (or instance number), the attribute and what is wrong with it."""


@dataclass
class StudyResult:
    pseudonym: str = ""
    study_uids: dict[str, str] = field(default_factory=dict)   # original -> pseudonymized
    instances: int = 0
    bytes_in: int = 0
    refused: list[Refused] = field(default_factory=list)       # policy "send-rest" only

    @property
    def pseudo_study_uid(self) -> str:
        return next(iter(self.study_uids.values()), "")


def read_instance(item: Instance, name: str) -> Dataset:
    """Read one instance; a non-DICOM or truncated input is a DeidError naming it.

    Files without the Part 10 header (no preamble, no file meta) are read when their content is
    a dataset (SOPClassUID and SOPInstanceUID at least); they get the file meta they lack."""
    if isinstance(item, Dataset):
        return item
    try:
        src = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item
        try:
            ds = pydicom.dcmread(src)
        except InvalidDicomError:
            if not isinstance(src, io.BytesIO) and not Path(src).is_file():
                raise FileNotFoundError(src) from None
            ds = _read_headerless(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else src)
    except DeidError as exc:
        raise exc.locate(name) from None
    except FileNotFoundError:
        raise DeidError("no such file").locate(name) from None
    except Exception as exc:  # pydicom raises many kinds on cut-off files
        raise DeidError(f"unreadable DICOM ({type(exc).__name__}); truncated or corrupt").locate(name) from None
    _check_complete(ds, name)
    return ds


_TS_OF_ENCODING = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                   (False, False): ExplicitVRBigEndian}


def _read_headerless(src) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(src, force=True)
    if 0x00080016 not in ds or 0x00080018 not in ds or not text_of(ds, 0x00080018):
        raise DeidError("not a DICOM file: no Part 10 header (DICM), and the content does not read as a"
                        " dataset with SOPClassUID (0008,0016) and SOPInstanceUID (0008,0018)")
    pixels = ds.get_item(0x7FE00010) if 0x7FE00010 in ds else None
    if pixels is not None and getattr(pixels, "length", 0) == 0xFFFFFFFF:
        raise DeidError("no Part 10 header and PixelData (7FE0,0010) is encapsulated: its transfer"
                        " syntax (the compression) is not recorded anywhere")
    implicit, little = ds.original_encoding
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = text_of(ds, 0x00080016)
    meta.MediaStorageSOPInstanceUID = text_of(ds, 0x00080018)
    meta.TransferSyntaxUID = _TS_OF_ENCODING[(bool(implicit), little is not False)]
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
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
        raise DeidError("PixelData (7FE0,0010) without a usable image description (Rows, Columns,"
                        " BitsAllocated)").locate(name) from None
    have = len(ds.get_item(0x7FE00010).value or b"")  # raw: no need to decode the pixels
    if have < expected:
        raise DeidError(f"truncated: PixelData (7FE0,0010) has {have} of {expected} bytes").locate(name)


@dataclass
class Outgoing:
    """A de-identified instance that passed the leak check, and its Part 10 bytes as checked."""
    dataset: Dataset
    data: bytes


def encode_part10(ds: Dataset) -> tuple[bytes, int]:
    """(Part 10 bytes, offset where the pixel data start)."""
    return _encode(ds, PIXEL_TAGS)[:2]


class StudyPseudonymizer:
    """De-identify instances of one patient's study(ies); yields datasets that passed the leak check.

    The removed patient/study attributes are stored at the site as the first instance is read;
    the UID map is kept by the store (SiteStore.put_uids) until whoever lets an instance leave
    flushes it (the send step's STOW-RS stream syncs before each batch, the deid command flushes
    before each file), so anything returned can be re-identified.

    `policy` says what one refused instance does: "refuse-study" (default) raises its `Refused`
    and the study stops; "send-rest" records it in `result.refused` and goes on with the rest.
    """

    def __init__(self, *, key: bytes, domain: str, provider: PseudonymProvider, store: SiteStore,
                 options=(), expect_patient_id: str | None = None, expect_study_uid: str | None = None,
                 policy: str = "refuse-study", pixel_recipes=()):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy for a refused instance {policy!r}; known: {', '.join(POLICIES)}")
        self.deid = Deidentifier(key, domain, options)
        self.pixel_rules = pixels.load(pixel_recipes)
        self.key = key
        self.domain = domain
        self.provider = provider
        self.store = store
        self.expect_patient_id = expect_patient_id
        self.expect_study_uid = expect_study_uid
        self.policy = policy
        self.identity = Identity()
        self.result = StudyResult()
        self._patient_id: str | None = None
        self._stored_studies: set[str] = set()

    def process(self, instances: Iterable[tuple[str, Instance]]) -> Iterator[Outgoing]:
        """One instance at a time: read, de-identify, encode, leak-check; nothing is buffered."""
        for name, item in instances:
            try:
                out = self.process_encoded(item, name)
            except Refused as exc:
                if self.policy != "send-rest":
                    raise
                self.result.refused.append(exc)
                continue
            yield out

    def process_one(self, item: Instance, name: str = "instance") -> Dataset:
        return self.process_encoded(item, name).dataset

    def process_encoded(self, item: Instance, name: str = "instance") -> Outgoing:
        """One instance; a `Refused` (DeidError, LeakError) names the file, the instance (its
        pseudonymized SOPInstanceUID), the attribute and the rule."""
        instance = ""
        try:
            ds = read_instance(item, name)
            original_sop = text_of(ds, 0x00080018)
            instance = uid_for_name(self.key, self.domain, original_sop)
            return self._process(ds, item)
        except Refused as exc:
            raise exc.locate(name, instance)

    def _process(self, ds: Dataset, item: Instance) -> Outgoing:
        size = len(item) if isinstance(item, (bytes, bytearray)) else (
            Path(item).stat().st_size if isinstance(item, (str, os.PathLike)) and Path(item).exists() else 0)
        patient_id = text_of(ds, 0x00100020)
        if not patient_id:
            raise DeidError("missing PatientID (0010,0020) (rule: every instance names its patient)")
        if self.expect_patient_id is not None and patient_id != self.expect_patient_id:
            raise DeidError("PatientID (0010,0020) does not match the requested patient"
                            " (rule: only the requested patient's instances)")
        if self._patient_id is None:
            self._patient_id = patient_id
            self.result.pseudonym = self.provider.pseudonymize(self.domain, patient_id)
        elif patient_id != self._patient_id:
            raise DeidError("PatientID (0010,0020) differs from the study's first instance"
                            " (rule: one patient per study)")
        study_uid = text_of(ds, 0x0020000D)
        if not study_uid or not text_of(ds, 0x00080018):
            raise DeidError("missing StudyInstanceUID (0020,000D) or SOPInstanceUID (0008,0018)"
                            " (rule: every instance names its study and itself)")
        if self.expect_study_uid and study_uid != self.expect_study_uid:
            raise DeidError("StudyInstanceUID (0020,000D) does not match the requested study"
                            " (rule: only the requested study's instances)")

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
        # kept by the store until the instance is about to leave (the consumer flushes it)
        self.store.put_uids(self.domain, self.deid.new_uids)
        self.deid.new_uids = {}
        self._clean_pixels(ds)
        check_flags(ds)
        data, pixels_start, pixels_end = _encode(ds, PIXEL_TAGS)
        hits = encoded_hits(data, self.identity, codec_of(ds), (pixels_start, pixels_end))
        if hits:
            raise LeakError(hits=hits)
        self.result.instances += 1
        self.result.bytes_in += size
        return Outgoing(ds, data)

    def _clean_pixels(self, ds: Dataset) -> None:
        """Pixels that may show text are cleaned by the first recipe covering the image, else
        the instance is refused naming what no recipe covers."""
        problem = burned_in_problem(ds)
        if problem is None:
            return
        rule = pixels.match(self.pixel_rules, ds)
        if rule is None:
            raise LeakError(f"{problem}; no pixel recipe covers {pixels.describe(ds)} (rule: {RULE_BURNED_IN})")
        pixels.clean(ds, rule)


def uid_for_name(key: bytes, domain: str, original: str) -> str:
    """The pseudonymized UID that names an instance in messages (the original never appears)."""
    return uid_for(key, domain, original) if original else ""
