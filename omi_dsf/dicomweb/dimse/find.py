"""C-FIND (Study Root) on a pooled association."""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from ..errors import BadRequest, PacsTimeout, PacsUnavailable
from .connection import AssociationPool, messages
from .contexts import FIND
from .messages import C_FIND_RSP, CANCELLED, COMMAND_FIELD, PENDING, STATUS, SUCCESS, decoded, encoded, find_rq, us_of

log = logging.getLogger(__name__)


def c_find(pool: AssociationPool, identifier: Dataset, msg_id: int) -> list[Dataset]:
    """All matches of a C-FIND; BadRequest for a value that cannot be encoded (nothing sent),
    PacsUnavailable/PacsTimeout otherwise, never a hang."""
    for attempt in (1, 2):
        conn, reused = pool.acquire()
        ts = conn.accepted[1]
        results: list[Dataset] = []
        ok = False
        try:
            payload = encoded(identifier, ts)
        except BadRequest:   # a value the client sent; nothing went to the PACS
            pool.release(conn, reusable=True)
            raise
        try:
            conn.send_message(1, find_rq(FIND, msg_id), payload)
            for _cid, cmd, data in messages(conn):
                if us_of(cmd, COMMAND_FIELD) != C_FIND_RSP:
                    raise PacsUnavailable(f"C-FIND: unexpected answer from PACS {pool.peer.aet}")
                status = us_of(cmd, STATUS)
                if status in PENDING:
                    if data:
                        results.append(decoded(data, ts))
                    continue
                if status == SUCCESS:
                    ok = True
                    break
                if status == CANCELLED:
                    raise PacsUnavailable("C-FIND was cancelled by the PACS")
                ok = True  # the association itself is fine
                raise PacsUnavailable(f"C-FIND: PACS {pool.peer.aet} answered with failure status "
                                      f"0x{status:04X}")
        except PacsTimeout:
            pool.release(conn, reusable=False)
            raise
        except PacsUnavailable:
            pool.release(conn, reusable=ok)
            if attempt == 1 and reused and not ok and not results:
                log.debug("pooled association was stale; retrying C-FIND on a new one")
                continue
            raise
        pool.release(conn, reusable=True)
        return results
    raise AssertionError("unreachable")
