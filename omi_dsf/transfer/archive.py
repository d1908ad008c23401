"""The re-identified results into the requester's PACS: STOW-RS to the site's own DICOMweb
gateway, which stores them in its PACS by C-STORE (the gateway's default backend).

Site settings (`steps:` in the site YAML, omi_dsf.steps.settings): gateway_url, the DICOMweb base
URL of the site's gateway (the one the send step reads from), and gateway_ca_file, the CA of its
server certificate for https (default: the system CAs).

A gateway that does not answer or answers 5xx, or a PACS out of resources, raises a RetryableError
(the runtime retries); a gateway or PACS that refuses the results for a reason retrying cannot fix
(a rejected association, an unsupported SOP class) is a TransferError. Messages name counts,
status codes and the gateway's URL only.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Sequence

from pydicom.dataset import Dataset

from omi_dsf.dicomweb_client import DicomwebClient, DicomwebError, DicomwebRefused
from omi_dsf.errors import RetryableError
from omi_dsf.peer import Peer, PeerConfigError, PeerTlsError
from omi_dsf.transfer.errors import TransferError

FAILED_SOP_SEQ, FAILURE_REASON = "00081198", "00081197"
OUT_OF_RESOURCES = 0xA700


class ArchiveBusy(RuntimeError, RetryableError):
    """The site's gateway or its PACS cannot take the results now; a later attempt may succeed."""


def site_gateway(url: str | None, ca_file: Path | str | None) -> Peer:
    if not url:
        raise TransferError("site configuration steps.gateway_url is missing: the results are stored "
                            "through the site's DICOMweb gateway")
    try:
        return Peer(url=str(url).rstrip("/"), ca_file=str(ca_file) if ca_file else None, timeout=120,
                    where="steps.gateway_url")
    except PeerConfigError as exc:
        raise TransferError(str(exc)) from None


def part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def store_results(gateway_url: str | None, gateway_ca_file: Path | str | None, datasets: Sequence[Dataset]) -> str:
    """STOW-RS of every dataset to the site's gateway; its URL (for the audit)."""
    peer = site_gateway(gateway_url, gateway_ca_file)
    try:
        with DicomwebClient(peer) as dicomweb:
            stow = dicomweb.store_instances([part10(ds) for ds in datasets])
    except PeerTlsError as exc:
        raise TransferError(f"TLS with the site's gateway failed: {str(exc).split(' failed: ', 1)[-1]}") from None
    except DicomwebRefused as exc:
        raise TransferError(f"the site's gateway {peer.url} refused the results (HTTP {exc.status}"
                            f"{': ' + exc.reason if exc.reason else ''})") from None
    except DicomwebError as exc:
        if "rejected the association" in (exc.reason or ""):
            raise TransferError(f"the site's gateway {peer.url} cannot store in its PACS: {exc.reason}") from None
        raise ArchiveBusy(f"the site's gateway {peer.url} did not store the results (HTTP {exc.status}"
                          f"{': ' + exc.reason if exc.reason else ''})") from None
    failed = (stow.answer.get(FAILED_SOP_SEQ) or {}).get("Value") or []
    codes = sorted({int(((f.get(FAILURE_REASON) or {}).get("Value") or [0])[0]) for f in failed})
    if failed or stow.status == 409:
        text = ", ".join(f"0x{c:04X}" for c in codes) or "none given"
        what = f"the PACS behind the site's gateway refused {len(failed) or len(datasets)} of {len(datasets)} results"
        if codes and all(c >> 8 == OUT_OF_RESOURCES >> 8 for c in codes):
            raise ArchiveBusy(f"{what} (out of resources: {text})")
        raise TransferError(f"{what} (failure reason {text})")
    return peer.url
