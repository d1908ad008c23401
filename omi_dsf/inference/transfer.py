"""DICOMweb transfers of the `infer` step: one series in by WADO-RS, result objects out by STOW-RS,
through the one DICOMweb client (omi_dsf.dicomweb_client).

WADO-RS: the multipart answer is parsed part by part as it streams in (the gateway's own
incremental reader), so decoding overlaps the gateway's sending instead of following it; each
instance's Pixel Data stays in the part's bytes (`volume.read_instance`: the volume takes
uncompressed pixels from there, not from a copy). Instances are asked for with transfer-syntax=*
(as stored): a gateway then need not parse each instance to see whether it must convert it, and
the volume check decides what it can decode.
STOW-RS: instances go as the Part 10 bytes they already are (a prepared SEG is never re-encoded).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from omi_dsf.dicomweb_client import BadAnswer, DicomwebClient
from omi_dsf.inference.volume import read_instance


class MultipartError(ValueError):
    """The answer is not the multipart/related body it claims to be (or was cut off): retried."""


def retrieve_series(dicomweb: DicomwebClient, study_uid: str, series_uid: str) -> list[Dataset]:
    """All instances of a series, as stored at the gateway."""
    try:
        return [read_instance(body) for body in dicomweb.iter_series(study_uid, series_uid, "*")]
    except BadAnswer as exc:   # truncated or malformed: the runtime retries
        raise MultipartError(str(exc)) from None


class StoreFailed(RuntimeError):
    """The gateway did not store every instance (HTTP 202 or 409: some failed); transient, retried."""


def store_instances(dicomweb: DicomwebClient, instances: list[bytes]) -> None:
    """STOW-RS of Part 10 instances in one request; raises unless the gateway stored them all."""
    status = dicomweb.store_instances(instances).status
    if status != 200:
        # the answer names the failed instances by UID; the status alone is enough for the Task
        raise StoreFailed(f"the gateway stored only some of the {len(instances)} result objects "
                          f"(STOW-RS HTTP {status})")
