"""The presentation contexts the gateway proposes and accepts, per service."""

from __future__ import annotations

from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
                         RLELossless)
from pynetdicom import StoragePresentationContexts
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)

from .pdu import Proposal

FIND = str(StudyRootQueryRetrieveInformationModelFind)
GET = str(StudyRootQueryRetrieveInformationModelGet)
MOVE = str(StudyRootQueryRetrieveInformationModelMove)
VERIFICATION = "1.2.840.10008.1.1"

UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
# What we take on storage contexts (C-GET sub-operations, the C-MOVE destination): as stored.
STORAGE_SYNTAXES = tuple(str(ts) for ts in (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless))
STORAGE_CLASSES = tuple(str(cx.abstract_syntax) for cx in StoragePresentationContexts)


def find_proposals() -> tuple[Proposal, ...]:
    return ((FIND, UNCOMPRESSED),)


def move_proposals() -> tuple[Proposal, ...]:
    return ((MOVE, UNCOMPRESSED),)


def get_proposals() -> tuple[Proposal, ...]:
    """Study Root Get (context id 1) and a storage context for every SOP class that C-GET
    sub-operations may use: with pynetdicom's 120 storage classes they fit the 128-context limit."""
    return ((GET, UNCOMPRESSED),) + tuple((sc, STORAGE_SYNTAXES) for sc in STORAGE_CLASSES[:127])


def store_proposals(items: list[tuple[str, str]]) -> tuple[Proposal, ...]:
    """For C-STORE of (SOP class, transfer syntax) items: per SOP class, the syntaxes the items
    have, then the uncompressed ones (the PACS chooses)."""
    syntaxes: dict[str, list[str]] = {}
    for sop_class, ts in items:
        wanted = syntaxes.setdefault(sop_class, [])
        for t in (ts, *UNCOMPRESSED):
            if t not in wanted:
                wanted.append(t)
    return tuple((sc, tuple(tss)) for sc, tss in syntaxes.items())


def storage_scp_contexts() -> dict[str, frozenset[str]]:
    """What the C-MOVE destination accepts: every storage class as stored, and Verification."""
    return {**{sc: frozenset(STORAGE_SYNTAXES) for sc in STORAGE_CLASSES}, VERIFICATION: frozenset(UNCOMPRESSED)}
