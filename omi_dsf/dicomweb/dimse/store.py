"""C-STORE of received (STOW-RS) instances on one association with the contexts they need.

Each data set goes as received when the PACS accepted its transfer syntax; between the two
uncompressed Little Endian syntaxes it is re-encoded; a compressed instance the PACS takes only
uncompressed is refused (0xC122), never decompressed here.
"""

from __future__ import annotations

import logging
from io import BytesIO

from pydicom import dcmread

from ..errors import PacsTimeout, PacsUnavailable
from ..part10 import TRANSFER_SYNTAX_NOT_SUPPORTED, Refused, read_meta
from .connection import Peer, messages, next_message_id, open_association, release
from .contexts import UNCOMPRESSED, store_proposals
from .messages import (C_STORE_RSP, COMMAND_FIELD, PROCESSING_FAILURE, RESPONDED_TO, SOP_CLASS_NOT_SUPPORTED,
                       STATUS, dataset_bytes, store_rq, us_of)

log = logging.getLogger(__name__)

ERROR_COMMENT = 0x00000902
Item = tuple[str, str, str, bytes]    # SOP class, SOP instance, transfer syntax, Part 10 bytes


def _payload(data: bytes, ts: str, accepted_ts: str) -> bytes | memoryview | None:
    """The data set to send in ``accepted_ts``; None when it cannot be had without transcoding."""
    if ts == accepted_ts:
        _, start = read_meta(data)
        return memoryview(data)[start:]
    if ts in UNCOMPRESSED and accepted_ts in UNCOMPRESSED:
        return dataset_bytes(dcmread(BytesIO(data)), implicit=accepted_ts == UNCOMPRESSED[1])
    return None


def c_store(calling_aet: str, peer: Peer, items: list[Item]) -> list[tuple[int, str]]:
    """Store the items; one ``(status, comment)`` per item. PacsUnavailable when there is no
    association."""
    proposals = store_proposals([(sc, ts) for sc, _, ts, _ in items])
    if len(proposals) > 128:
        raise PacsUnavailable("more than 128 different SOP classes in one request")
    conn = open_association(calling_aet, peer, proposals)
    answers = messages(conn)
    results: list[tuple[int, str]] = []
    clean = False
    try:
        for sop_class, sop, ts, data in items:
            if conn.closed:
                results.append((PROCESSING_FAILURE, "the PACS dropped the association"))
                continue
            cid = conn.context_for(sop_class, (ts, *UNCOMPRESSED))
            if cid is None:
                if conn.context_for(sop_class) is None:
                    results.append((SOP_CLASS_NOT_SUPPORTED, "the PACS does not accept this SOP class"))
                else:
                    results.append((TRANSFER_SYNTAX_NOT_SUPPORTED, "the PACS does not accept this transfer syntax "
                                    "for this SOP class"))
                continue
            try:
                payload = _payload(data, ts, conn.accepted[cid])
            except (Refused, ValueError, TypeError, AttributeError, KeyError) as exc:
                results.append((PROCESSING_FAILURE, f"C-STORE not sent: {type(exc).__name__}"))
                continue
            if payload is None:
                results.append((TRANSFER_SYNTAX_NOT_SUPPORTED, "the PACS does not accept this transfer syntax "
                                "for this SOP class"))
                continue
            msg_id = next_message_id()
            try:
                conn.send_message(cid, store_rq(sop_class, sop, msg_id), payload)
                _, cmd, _ = next(answers)
            except (PacsUnavailable, PacsTimeout, StopIteration) as exc:
                conn.abort()
                results.append((PROCESSING_FAILURE, f"no answer from the PACS ({str(exc)[:120] or 'closed'})"))
                continue
            if us_of(cmd, COMMAND_FIELD) != C_STORE_RSP or us_of(cmd, RESPONDED_TO) != msg_id:
                conn.abort()
                results.append((PROCESSING_FAILURE, "the PACS answered something else than a C-STORE-RSP"))
                continue
            comment = cmd.get(ERROR_COMMENT, b"").rstrip(b"\x00 ").decode("ascii", "replace")
            results.append((us_of(cmd, STATUS, PROCESSING_FAILURE), comment))
        clean = not conn.closed
    finally:
        answers.close()
        if clean:
            release(conn)
        else:
            conn.abort()
    return results
