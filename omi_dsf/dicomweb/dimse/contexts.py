"""The presentation contexts the gateway proposes and accepts, per service."""

from __future__ import annotations

from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
                         RLELossless, UID)
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


LOSSY = frozenset(str(ts) for ts in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000))


def find_proposals() -> tuple[Proposal, ...]:
    return ((FIND, UNCOMPRESSED),)


def move_proposals() -> tuple[Proposal, ...]:
    return ((MOVE, UNCOMPRESSED),)


# C-GET storage contexts: one per transfer-syntax family, uncompressed first. A PACS accepts one
# syntax per context and then sends each instance on a context of its SOP class, converting the
# instance to that context's syntax: many (dcmqrscp) take the first accepted context of the class,
# others one whose syntax is the instance's. One context holding every syntax let a PACS that
# prefers JPEG accept JPEG Baseline for it and then fail (0xA702) on every instance it could not
# compress. Only lossless syntaxes are proposed: a PACS may decompress what it stores lossy, but is
# never asked to compress lossy.
FAMILIES = (
    UNCOMPRESSED,
    (str(JPEGLosslessSV1), "1.2.840.10008.1.2.4.57"),      # JPEG Lossless (process 14, and SV1)
    (str(JPEGLSLossless),),
    (str(JPEG2000Lossless),),
    (str(RLELossless),),
)
# The classes whose instances are stored compressed in practice get a context per family; the
# rest one uncompressed context each, first those a request here meets (results, reports, RT).
IMAGE_CLASSES = tuple(f"1.2.840.10008.5.1.4.1.1.{n}" for n in (
    "2", "4", "1", "1.1", "1.1.1", "1.2", "1.2.1", "128", "20", "12.1", "6.1", "3.1", "7"))
FIRST_CLASSES = tuple(f"1.2.840.10008.5.1.4.1.1.{n}" for n in (
    "66.4", "88.11", "88.22", "88.33", "88.34", "88.59", "88.67", "104.1", "104.2", "2.1", "2.2", "4.1",
    "4.4", "128.1", "130", "481.1", "481.2", "481.3", "481.5", "481.8", "11.1", "11.2", "11.3", "11.4",
    "66", "66.1", "66.2", "66.3", "66.5", "67", "7.1", "7.2", "7.3", "7.4", "12.1.1", "12.2", "12.2.1",
    "13.1.3", "6.2", "77.1.1", "77.1.2", "77.1.4", "77.1.5.1", "77.1.5.2", "77.1.5.4", "77.1.6",
    "9.1.1", "9.1.2", "9.2.1", "4.2", "4.3", "88.40", "88.50", "88.65", "88.69", "88.70"))


def get_proposals() -> tuple[Proposal, ...]:
    """Study Root Get (context id 1), then the storage contexts C-GET sub-operations may use,
    within the 128-context limit."""
    out: list[Proposal] = [(GET, UNCOMPRESSED)]
    for sc in IMAGE_CLASSES:
        out.extend((sc, family) for family in FAMILIES)
    for sc in dict.fromkeys((*FIRST_CLASSES, *(sc for sc in STORAGE_CLASSES if not UID(sc).is_retired))):
        if len(out) == 128:
            break
        if sc not in IMAGE_CLASSES:
            out.append((sc, UNCOMPRESSED))
    return tuple(out)


# For what a PACS could not send in the first pass (it takes the first accepted context of a class
# and cannot convert to it, as dcmqrscp with JPEG data it cannot decode): one more C-GET per
# compressed family, proposing only that family for the image classes, lossless ones first. A
# lossy syntax is asked for only here, for instances the PACS sent neither uncompressed nor
# lossless: stored lossy.
RETRY_FAMILIES = FAMILIES[1:] + (
    (str(JPEGBaseline8Bit), str(JPEGExtended12Bit)),
    (str(JPEGLSNearLossless),),
    (str(JPEG2000),),
)


def retry_proposals(family: tuple[str, ...]) -> tuple[Proposal, ...]:
    return ((GET, UNCOMPRESSED),) + tuple((sc, family) for sc in IMAGE_CLASSES)


def store_proposals(items: list[tuple[str, str]]) -> tuple[Proposal, ...]:
    """For C-STORE of (SOP class, transfer syntax) items: per SOP class, one context with the
    uncompressed syntaxes, then one for each other syntax the items have. A PACS accepts one
    syntax per context: offered together, a PACS that prefers uncompressed data (Orthanc) took
    Explicit VR Little Endian for a JPEG Lossless instance, which then could not be sent (0xC122)."""
    syntaxes: dict[str, list[tuple[str, ...]]] = {}
    for sop_class, ts in items:
        wanted = syntaxes.setdefault(sop_class, [UNCOMPRESSED])
        if ts not in UNCOMPRESSED and (ts,) not in wanted:
            wanted.append((ts,))
    return tuple((sc, tss) for sc, family in syntaxes.items() for tss in family)


def storage_scp_contexts() -> dict[str, frozenset[str]]:
    """What the C-MOVE destination accepts: every storage class as stored, and Verification."""
    return {**{sc: frozenset(STORAGE_SYNTAXES) for sc in STORAGE_CLASSES}, VERIFICATION: frozenset(UNCOMPRESSED)}
