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

from omi_dsf.dicomweb_client import (BadAnswer, DicomwebBusy, DicomwebError, DicomwebRefused, InstanceChanged,
                                     StowAnswer)
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


def as_transfer_error(exc: DicomwebError, what: str) -> Exception:
    """The DICOMweb client's error as the send and return steps word it."""
    status = exc.status
    if isinstance(exc, DicomwebBusy):
        return GatewayBusy(f"{what} at the provider's gateway: HTTP {status}")
    if isinstance(exc, BadAnswer):
        return GatewayBusy(f"{what}: the provider's gateway's answer is not a complete DICOMweb answer")
    if status in (401, 403):
        return TransferError(f"{what}: the provider's gateway refused us (HTTP {status}); check client_cert or "
                             "token_file for this provider")
    if status == 413:
        return TransferError(f"{what}: the provider's gateway refused the size (HTTP 413); lower send.batch_mb")
    return TransferError(f"{what}: the provider's gateway refused the request (HTTP {status})")


def instances_at_gateway(gw: ProviderGateway, study_uid: str) -> set[str]:
    """SOP Instance UIDs of the study the gateway holds now (QIDO-RS); empty when it has none."""
    found: set[str] = set()
    offset, page = 0, 1000
    while True:
        try:
            items = gw.translated(gw.dicomweb.search_for_instances, study_uid, fields=[SOP_UID], limit=page,
                                  offset=offset)
        except DicomwebRefused as exc:
            if exc.status == 404:
                return found
            raise as_transfer_error(exc, "QIDO-RS search of the study") from None
        except DicomwebError as exc:
            raise as_transfer_error(exc, "QIDO-RS search of the study") from None
        found.update(str(first_value(i, SOP_UID)) for i in items if first_value(i, SOP_UID))
        if len(items) < page:
            return found
        offset += len(items)


def study_instance_count(gw: ProviderGateway, study_uid: str) -> int | None:
    """NumberOfStudyRelatedInstances the gateway gives for the study (one cheap study-level
    QIDO-RS), or None when it gives none we can use."""
    try:
        found = gw.translated(gw.dicomweb.search_for_studies, fields=[STUDY_INSTANCES],
                              search_filters={"StudyInstanceUID": study_uid})
    except DicomwebRefused as exc:
        return 0 if exc.status == 404 else None
    except DicomwebError:
        return None
    if not found:
        return 0
    try:
        items = [i for i in found if first_value(i, STUDY_UID) == study_uid]
        return int(first_value(items[0], STUDY_INSTANCES)) if len(items) == 1 else None
    except (ValueError, TypeError, AttributeError, IndexError):
        return None


def _post(gw: ProviderGateway, study_uid: str, batch: list[Path]) -> set[str]:
    """STOW-RS of one batch, streamed from the files; the SOP Instance UIDs the gateway's answer
    names as stored."""
    try:
        stow: StowAnswer = gw.translated(gw.dicomweb.store_instances, study_instance_uid=study_uid, files=batch)
    except InstanceChanged:  # the Content-Length would lie; and it is not what was leak-checked
        raise TransferError("an instance of the checked study changed while it was being sent") from None
    except DicomwebError as exc:
        raise as_transfer_error(exc, "STOW-RS") from None
    answer = stow.answer
    if stow.status in (409, 202):
        # some or all instances refused: say how many and why (the reason codes are not patient data)
        failed = (answer.get(FAILED_SOP_SEQ) or {}).get("Value") or []
        reasons = sorted({f"0x{int(first_value(f, FAILURE_REASON) or 0):04X}" for f in failed})
        if failed:
            raise TransferError(f"STOW-RS: the provider's gateway refused {len(failed)} of {len(batch)} instances "
                            f"(failure reason {', '.join(reasons)})")
        if stow.status == 409:
            raise TransferError("STOW-RS: the provider's gateway refused the instances (HTTP 409)")
    return _referenced(answer)  # 200, or 202 with warnings only: stored


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
