"""STOW-RS of a checked study to the provider's gateway, so that a retry never makes a second copy.

Idempotency rests on two things: the instances keep their SOP Instance UIDs on every attempt
(pseudonymization is deterministic), and before sending we ask the gateway (QIDO-RS) which of
them it already holds and send only the rest. So a send that crashed after half the batches
resumes with the other half; the OMI gateway's store would also replace an instance stored
again, but a PACS behind another gateway might not.

Each batch is streamed from the files as it is sent (the gateway stores parts while the rest
arrives), and afterwards the gateway must account for every instance: each one named stored in a
STOW-RS answer (or listed before we sent) and the study's instance count at the gateway exactly
what that implies; otherwise, or when the gateway gives no count, its full QIDO-RS listing decides
(the count costs the gateway a few ms, the listing of 200 instances ~0.15 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omi_dsf.dicomweb.multipart import closing, content_type, new_boundary, part_head
from omi_dsf.transfer.errors import TransferError
from omi_dsf.transfer.provider import ProviderGateway

SOP_UID, FAILED_SOP_SEQ, FAILURE_REASON = "00080018", "00081198", "00081197"
REFERENCED_SOP_SEQ, REFERENCED_SOP_UID = "00081199", "00081155"
STUDY_UID, STUDY_INSTANCES = "0020000D", "00201208"
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
        raise TransferError(f"{what}: the provider's gateway refused us (HTTP {status}); check client_cert or "
                        "token_file for this provider")
    if status == 413:
        raise TransferError(f"{what}: the provider's gateway refused the size (HTTP 413); lower send.batch_mb")
    raise TransferError(f"{what}: the provider's gateway refused the request (HTTP {status})")


def study_instance_count(gw: ProviderGateway, study_uid: str) -> int | None:
    """NumberOfStudyRelatedInstances the gateway gives for the study (one cheap study-level
    QIDO-RS), or None when it gives none we can use."""
    resp = gw.request("GET", "/studies", params={"StudyInstanceUID": study_uid, "includefield": STUDY_INSTANCES},
                      headers={"Accept": "application/dicom+json"})
    if resp.status_code in (204, 404):
        return 0
    if resp.status_code != 200:
        return None
    try:
        items = [i for i in resp.json() if first_value(i, STUDY_UID) == study_uid]
        return int(first_value(items[0], STUDY_INSTANCES)) if len(items) == 1 else None
    except (ValueError, TypeError, AttributeError, IndexError):
        return None


class _Body:
    """One batch's multipart body, read file by file while requests sends it: the worker holds
    one instance instead of the batch, and the gateway starts on the first instances while the
    rest is read. With a length, so it goes as Content-Length (a gateway can refuse it by size at
    once), not chunked."""

    def __init__(self, boundary: str, files: list[Path]):
        self.head = part_head(boundary, "application/dicom")
        self.tail = closing(boundary)
        self.files = files
        self.sizes = [p.stat().st_size for p in files]
        self.length = sum(len(self.head) + n + 2 for n in self.sizes) + len(self.tail)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for path, size in zip(self.files, self.sizes):
            data = path.read_bytes()
            if len(data) != size:  # the Content-Length would lie; and it is not what was leak-checked
                raise TransferError("an instance of the checked study changed while it was being sent")
            yield self.head + data + b"\r\n"
        yield self.tail


def _post(gw: ProviderGateway, study_uid: str, batch: list[Path]) -> set[str]:
    """STOW-RS of one batch; the SOP Instance UIDs the gateway's answer names as stored."""
    boundary = new_boundary()
    headers = {"Content-Type": content_type(boundary, "application/dicom"),
               "Accept": "application/dicom+json"}
    resp = gw.request("POST", f"/studies/{study_uid}", data=_Body(boundary, batch), headers=headers)
    if resp.status_code == 409 or resp.status_code == 202:
        # some or all instances refused: say how many and why (the reason codes are not patient data)
        answer = _json(resp)
        failed = (answer.get(FAILED_SOP_SEQ) or {}).get("Value") or []
        reasons = sorted({f"0x{int(first_value(f, FAILURE_REASON) or 0):04X}" for f in failed})
        if failed:
            raise TransferError(f"STOW-RS: the provider's gateway refused {len(failed)} of {len(batch)} instances "
                            f"(failure reason {', '.join(reasons)})")
        if resp.status_code == 409:
            raise TransferError("STOW-RS: the provider's gateway refused the instances (HTTP 409)")
        return _referenced(answer)  # 202 with warnings only: stored
    raise_for_status(resp, "STOW-RS")
    return _referenced(_json(resp))


def _json(resp) -> dict:
    try:
        answer = resp.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _referenced(answer: dict) -> set[str]:
    items = (answer.get(REFERENCED_SOP_SEQ) or {}).get("Value") or []
    return {str(first_value(i, REFERENCED_SOP_UID)) for i in items if isinstance(i, dict)
            and first_value(i, REFERENCED_SOP_UID)}


def stow_study(gw: ProviderGateway, study_uid: str, files: list[Path], sop_uids: list[str],
               batch_bytes: int = BATCH_BYTES, batch_instances: int = BATCH_INSTANCES) -> StowOutcome:
    """Send the instances the gateway does not hold yet, then check that it holds all of them."""
    outcome = StowOutcome()
    have = instances_at_gateway(gw, study_uid)
    stored: set[str] = set()
    batch: list[Path] = []
    size = 0
    for path, sop in zip(files, sop_uids):
        if sop in have:
            outcome.skipped += 1
            continue
        batch.append(path)
        size += path.stat().st_size
        if size >= batch_bytes or len(batch) >= batch_instances:
            stored |= _post(gw, study_uid, batch)
            outcome.sent += len(batch)
            outcome.bytes += size
            batch, size = [], 0
    if batch:
        stored |= _post(gw, study_uid, batch)
        outcome.sent += len(batch)
        outcome.bytes += size
    wanted = set(sop_uids)
    # Cheap check first: all accounted for, and the gateway counts as many as that means (an
    # instance lost after its STOW answer lowers the count). Anything else: the full listing.
    if wanted <= have | stored and study_instance_count(gw, study_uid) == len(wanted | have):
        return outcome
    missing = wanted - instances_at_gateway(gw, study_uid)
    if missing:
        raise GatewayBusy(f"the provider's gateway lists {len(sop_uids) - len(missing)} of {len(sop_uids)} "
                          "instances after STOW-RS")
    return outcome
