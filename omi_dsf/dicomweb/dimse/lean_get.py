"""C-GET (Study Root) over the lean Upper Layer client: instances are handed on as they arrive.

A-ASSOCIATE-RQ (Get context + storage contexts with SCP role) → C-GET-RQ →
{C-STORE-RQ + data → C-STORE-RSP, C-GET-RSP pending}* → C-GET-RSP final → A-RELEASE.
Each instance goes to ``emit`` as Part 10 bytes: a file meta group + the data set exactly as sent.
When the client is gone (``token``), the association is aborted at once.

With ``head`` (the WADO-RS multipart part header), each instance is emitted as head + Part 10 in
the one buffer the PDV fragments are joined into anyway, and its C-STORE-RSP goes out before the
instance is handed on: the PACS starts the next sub-operation while the HTTP side wakes up, and
the HTTP side writes one buffer per instance.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from pydicom.dataset import Dataset

from ..errors import DicomwebError, NotFound, PacsUnavailable
from ..stream import CancelToken, Cancelled
from .association import Peer
from .lean_ul import (C_GET_RQ, C_GET_RSP, C_STORE_RQ, C_STORE_RSP, FIRST_CONTEXT_ID, NO_DATA, command,
                      encode_identifier, get_proposals, messages, open_association, pad, part10_meta, release,
                      uid_of, us, us_of)
from .retrieve import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, RetrieveSummary

log = logging.getLogger(__name__)


def store_rsp(cmd: dict[int, bytes], sop_class: bytes, sop: bytes, status: int) -> bytes:
    return command([(0x0002, pad(sop_class)), (0x0100, us(C_STORE_RSP)), (0x0120, cmd.get(0x00000110, us(0))),
                    (0x0800, us(NO_DATA)), (0x0900, us(status)), (0x1000, pad(sop))])


def lean_c_get(calling_aet: str, peer: Peer, identifier: Dataset, emit: Callable[[bytes], None],
               token: CancelToken, msg_id: int = 1,
               head: Callable[[], bytes] | None = None) -> RetrieveSummary:
    """C-GET ``identifier`` and ``emit`` every instance as it arrives (Part 10 bytes, after
    ``head()`` if given; then ``emit`` may only raise :class:`Cancelled`)."""
    summary = RetrieveSummary()
    started = time.monotonic()
    conn, accepted, proposed = open_association(calling_aet, peer, get_proposals(), scp_roles=True)
    done = False
    try:
        conn.send_message(FIRST_CONTEXT_ID, command([
            (0x0002, pad(proposed[FIRST_CONTEXT_ID])), (0x0100, us(C_GET_RQ)), (0x0110, us(msg_id)),
            (0x0700, us(0)), (0x0800, us(0x0000))]), encode_identifier(identifier, accepted[FIRST_CONTEXT_ID]))
        final = None

        def meta(cid: int, cmd: dict[int, bytes]) -> bytes:
            ts = accepted.get(cid)
            if ts is None or us_of(cmd, 0x00000100) != C_STORE_RQ:
                return b""
            group = part10_meta(uid_of(cmd, 0x00000002), uid_of(cmd, 0x00001000), ts)
            return group if head is None else head() + group

        for cid, cmd, data in messages(conn, token, prefix=meta):
            field = us_of(cmd, 0x00000100)
            if field == C_GET_RSP:
                status = us_of(cmd, 0x00000900)
                if status in (0xFF00, 0xFF01):
                    continue
                final = status
                summary.completed = us_of(cmd, 0x00001021)
                summary.failed = us_of(cmd, 0x00001022)
                summary.warning = us_of(cmd, 0x00001023)
                break
            if field != C_STORE_RQ:
                raise PacsUnavailable(f"C-GET: unexpected DIMSE command 0x{field:04X} from PACS {peer.aet}")
            sop_class, sop = uid_of(cmd, 0x00000002), uid_of(cmd, 0x00001000)
            ts = accepted.get(cid)
            status = 0x0000
            if ts is None or data is None:
                status = CANNOT_UNDERSTAND
            elif head is not None:
                # Answer first: the PACS waits for this answer before it sends the next instance.
                conn.send_message(cid, store_rsp(cmd, sop_class, sop, status))
                emit(data)  # raises Cancelled when the client is gone: the association is aborted
                summary.received += 1
                continue
            else:
                try:
                    emit(data)  # Part 10: meta() put the file meta group in front
                    summary.received += 1
                except Cancelled:
                    status = OUT_OF_RESOURCES
                except DicomwebError as exc:
                    summary.error = summary.error or exc
                    status = CANNOT_UNDERSTAND
            if status == OUT_OF_RESOURCES:
                raise Cancelled()
            conn.send_message(cid, store_rsp(cmd, sop_class, sop, status))
        if final == 0xFE00:
            raise PacsUnavailable("C-GET was cancelled by the PACS")
        if final not in (0x0000, 0xB000) and summary.received == 0:
            raise PacsUnavailable(f"C-GET: PACS {peer.aet} answered with failure status 0x{final:04X}")
        done = True
    finally:
        if done:
            release(conn)
        else:
            conn.abort()  # also when the client went away: the association goes at once
    log.debug("C-GET: %d instances in %.2f s", summary.received, time.monotonic() - started)
    if summary.received == 0:
        raise summary.error or NotFound("C-GET: the PACS has no instances for this request")
    return summary
