"""STOW-RS of a checked study to the provider's gateway, so that a retry never makes a second copy.

Idempotency rests on two things: the instances keep their SOP Instance UIDs on every attempt
(pseudonymization is deterministic), and before sending we ask the gateway (QIDO-RS) which of
them it already holds and send only the rest. So a send that crashed after half the batches
resumes with the other half; the OMI gateway's store would also replace an instance stored
again, but a PACS behind another gateway might not.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from omi_dsf.worker.api import StepError
from omi_dsf.worker.transfer_provider import ProviderGateway

SOP_UID, FAILED_SOP_SEQ, FAILURE_REASON = "00080018", "00081198", "00081197"
BATCH_BYTES = 32 << 20
BATCH_INSTANCES = 64


class GatewayBusy(RuntimeError):
    """The gateway answered 5xx or lost instances: transient, the runtime retries the step."""


@dataclass
class StowOutcome:
    sent: int = 0          # instances posted in this attempt
    skipped: int = 0       # already at the gateway from an earlier attempt
    bytes: int = 0


def first_value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def instances_at_gateway(gw: ProviderGateway, study_uid: str) -> set[str]:
    """SOP Instance UIDs of the study the gateway holds now (QIDO-RS); empty when it has none."""
    found: set[str] = set()
    offset, page = 0, 1000
    while True:
        resp = gw.request("GET", f"/studies/{study_uid}/instances",
                          params={"includefield": SOP_UID, "limit": page, "offset": offset},
                          headers={"Accept": "application/dicom+json"})
        if resp.status_code in (204, 404):
            return found
        raise_for_status(resp, "QIDO-RS search of the study")
        items = resp.json() if resp.content else []
        found.update(str(first_value(i, SOP_UID)) for i in items if first_value(i, SOP_UID))
        if len(items) < page:
            return found
        offset += len(items)


def raise_for_status(resp, what: str) -> None:
    status = resp.status_code
    if status < 400:
        return
    if status >= 500 or status == 429:
        raise GatewayBusy(f"{what} at the provider's gateway: HTTP {status}")
    if status in (401, 403):
        raise StepError(f"{what}: the provider's gateway refused us (HTTP {status}); check client_cert or "
                        "token_file for this provider")
    if status == 413:
        raise StepError(f"{what}: the provider's gateway refused the size (HTTP 413); lower send.batch_mb")
    raise StepError(f"{what}: the provider's gateway refused the request (HTTP {status})")


def _post(gw: ProviderGateway, study_uid: str, batch: list[bytes]) -> None:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                    for data in batch) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json"}
    resp = gw.request("POST", f"/studies/{study_uid}", data=body, headers=headers)
    if resp.status_code == 409 or resp.status_code == 202:
        # some or all instances refused: say how many and why (the reason codes are not patient data)
        try:
            answer = resp.json()
        except ValueError:
            answer = {}
        failed = (answer.get(FAILED_SOP_SEQ) or {}).get("Value") or []
        reasons = sorted({f"0x{int(first_value(f, FAILURE_REASON) or 0):04X}" for f in failed})
        if failed:
            raise StepError(f"STOW-RS: the provider's gateway refused {len(failed)} of {len(batch)} instances "
                            f"(failure reason {', '.join(reasons)})")
        if resp.status_code == 409:
            raise StepError("STOW-RS: the provider's gateway refused the instances (HTTP 409)")
        return  # 202 with warnings only: stored
    raise_for_status(resp, "STOW-RS")


def stow_study(gw: ProviderGateway, study_uid: str, files: list[Path], sop_uids: list[str],
               batch_bytes: int = BATCH_BYTES, batch_instances: int = BATCH_INSTANCES) -> StowOutcome:
    """Send the instances the gateway does not hold yet, then check that it holds all of them."""
    outcome = StowOutcome()
    have = instances_at_gateway(gw, study_uid)
    batch: list[bytes] = []
    size = 0
    for path, sop in zip(files, sop_uids):
        if sop in have:
            outcome.skipped += 1
            continue
        data = path.read_bytes()
        batch.append(data)
        size += len(data)
        if size >= batch_bytes or len(batch) >= batch_instances:
            _post(gw, study_uid, batch)
            outcome.sent += len(batch)
            outcome.bytes += size
            batch, size = [], 0
    if batch:
        _post(gw, study_uid, batch)
        outcome.sent += len(batch)
        outcome.bytes += size
    missing = set(sop_uids) - instances_at_gateway(gw, study_uid)
    if missing:
        raise GatewayBusy(f"the provider's gateway lists {len(sop_uids) - len(missing)} of {len(sop_uids)} "
                          "instances after STOW-RS")
    return outcome
