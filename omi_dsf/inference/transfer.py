"""DICOMweb transfers of the `infer` step: one series in by WADO-RS, result objects out by STOW-RS.

WADO-RS: the multipart answer is parsed part by part as it streams in (the gateway's own
incremental reader), so decoding overlaps the gateway's sending instead of following it. Instances are asked for with transfer-syntax=* (as
stored): a gateway then need not parse each instance to see whether it must convert it, and the
volume check decides what it can decode.
STOW-RS: instances go as the Part 10 bytes they already are (a prepared SEG is never re-encoded).
"""

from __future__ import annotations

from io import BytesIO

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset

from omi_dsf.dicomweb.errors import BadRequest
from omi_dsf.dicomweb.multipart import dicom_body, iter_bodies

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 1 << 20


class MultipartError(ValueError):
    """The answer is not the multipart/related body it claims to be (or was cut off): retried."""


def retrieve_series(session: requests.Session, base_url: str, study_uid: str, series_uid: str,
                    timeout: float) -> list[Dataset]:
    """All instances of a series, as stored at the gateway."""
    url = f"{base_url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"
    with session.get(url, headers={"Accept": ACCEPT}, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        bodies = iter_bodies(response.headers.get("Content-Type", ""), response.iter_content(CHUNK))
        try:
            return [dcmread(BytesIO(body)) for body in bodies]
        except BadRequest as exc:   # the gateway's own parser: here it is the answer that is broken
            raise MultipartError(f"WADO-RS {exc.message}") from None


class StoreFailed(RuntimeError):
    """The gateway did not store every instance (HTTP 202: some failed); transient, retried."""


def store_instances(session: requests.Session, base_url: str, instances: list[bytes], timeout: float) -> None:
    """STOW-RS of Part 10 instances in one request; raises unless the gateway stored them all."""
    body, ctype = dicom_body(instances)
    response = session.post(f"{base_url.rstrip('/')}/studies", data=body, timeout=timeout,
                            headers={"Content-Type": ctype, "Accept": "application/dicom+json"})
    response.raise_for_status()
    if response.status_code != 200:
        # the answer names the failed instances by UID; the status alone is enough for the Task
        raise StoreFailed(f"the gateway stored only some of the {len(instances)} result objects "
                          f"(STOW-RS HTTP {response.status_code})")
