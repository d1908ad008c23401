"""STOW-RS of checked instances to the provider's gateway as they come, so that a retry never
makes a second copy.

Idempotency rests on two things: the instances keep their SOP Instance UIDs on every attempt
(pseudonymization is deterministic), and before sending we ask the gateway (QIDO-RS) which of
them it already holds and send only the rest. So a send that crashed after half the batches
resumes with the other half; the OMI gateway's store would also replace an instance stored
again, but a PACS behind another gateway might not.

`StowStream` takes one instance at a time (its Part 10 bytes as the leak check saw them) and posts
batches on a thread of its own while the caller prepares the next instances; a batch is sent when
it reaches the batch size (bytes or instances), so the first bytes leave long before the last
instance is read. Afterwards the gateway must account for every instance: each one named stored in a
STOW-RS answer (or listed before we sent) and the study's instance count at the gateway exactly
what that implies; otherwise, or when the gateway gives no count, its full QIDO-RS listing decides
(the count costs the gateway a few ms, the listing of 200 instances ~0.15 s).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

from omi_dsf.dicomweb_client import BadAnswer, DicomwebBusy, DicomwebError, DicomwebRefused, StowAnswer
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
    bytes: int = 0         # bytes posted in this attempt


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


def _post(gw: ProviderGateway, study_uid: str, batch: list[bytes]) -> set[str]:
    """STOW-RS of one batch; the SOP Instance UIDs the gateway's answer names as stored."""
    try:
        stow: StowAnswer = gw.translated(gw.dicomweb.store_instances, batch, study_instance_uid=study_uid)
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


class StowStream:
    """The instances of one study to the gateway as they are added (`add`), in batches posted by a
    thread of its own (at most two batches wait for it); `finish` sends the rest and checks that
    the gateway holds every instance added (more may be added and finished after it: the send step's
    manifest, which must follow every instance). An error of the sending thread is raised by the next
    `add` or by `finish`; `close` stops the thread after the batches handed to it.

    `before_send` runs before each batch is handed to the thread (the send step makes the site
    store durable there, so that what leaves can always be re-identified)."""

    QUEUE = 2

    def __init__(self, gw: ProviderGateway, study_uid: str, batch_bytes: int = BATCH_BYTES,
                 batch_instances: int = BATCH_INSTANCES, before_send: Callable[[], None] = lambda: None):
        self.gw, self.study_uid = gw, study_uid
        self.batch_bytes, self.batch_instances = batch_bytes, batch_instances
        self.before_send = before_send
        self.outcome = StowOutcome()
        self.have = instances_at_gateway(gw, study_uid)   # from an earlier attempt
        self.wanted: set[str] = set()
        self.stored: set[str] = set()
        self._batch: list[bytes] = []
        self._size = 0
        self._queue: queue.Queue = queue.Queue(self.QUEUE)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def add(self, sop_uid: str, data: bytes) -> None:
        self._raise_error()
        self.wanted.add(sop_uid)
        if sop_uid in self.have:
            self.outcome.skipped += 1
            return
        self._batch.append(data)
        self._size += len(data)
        if self._size >= self.batch_bytes or len(self._batch) >= self.batch_instances:
            self._hand_over()

    def _hand_over(self) -> None:
        if not self._batch:
            return
        self.before_send()
        if self._thread is None:
            self._thread = threading.Thread(target=self._sender, name="omi-stow", daemon=True)
            self._thread.start()
        self._queue.put(self._batch)   # waits while two batches are queued: the reading slows down
        self._batch, self._size = [], 0

    def _sender(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._error is not None:
                continue            # drain after a failure; the caller is told once
            try:
                self.stored |= _post(self.gw, self.study_uid, batch)
                self.outcome.sent += len(batch)
                self.outcome.bytes += sum(len(b) for b in batch)
            except BaseException as exc:  # kept for the caller
                self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self.close()
            raise error

    def close(self) -> None:
        """Stop the sending thread once it has posted the batches already handed to it (each passed
        the leak check); the batch still being filled is dropped."""
        if self._thread is not None:
            self._batch, self._size = [], 0
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> StowOutcome:
        """Send the rest, then check that the gateway holds every instance added."""
        self._raise_error()
        self._hand_over()
        self.close()
        self._raise_error()
        wanted, have, stored = self.wanted, self.have, self.stored
        # Cheap check first: all accounted for, and the gateway counts as many as that means (an
        # instance lost after its STOW answer lowers the count). Anything else: the full listing.
        if wanted <= have | stored and study_instance_count(self.gw, self.study_uid) == len(wanted | have):
            return self.outcome
        missing = wanted - instances_at_gateway(self.gw, self.study_uid)
        if missing:
            raise GatewayBusy(f"the provider's gateway lists {len(wanted) - len(missing)} of {len(wanted)} "
                              "instances after STOW-RS")
        self.stored |= wanted      # seen there: a later `finish` (after more `add`s) need not list them again
        return self.outcome
