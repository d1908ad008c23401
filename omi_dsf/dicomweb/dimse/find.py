"""C-FIND (Study Root) over a pooled association."""

from __future__ import annotations

import logging
import time

from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from ..errors import PacsTimeout, PacsUnavailable
from .association import AssociationPool, abort, busy, next_message_id

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)


def lost(op: str, pool: AssociationPool, started: float) -> Exception:
    """The error for a DIMSE exchange that ended without a final status."""
    peer = pool.peer
    if time.monotonic() - started >= peer.dimse_timeout * 0.9:
        return PacsTimeout(f"{op}: PACS {peer.aet} did not answer within {peer.dimse_timeout:g} s")
    return PacsUnavailable(f"{op}: PACS {peer.aet} dropped the association")


def c_find(pool: AssociationPool, identifier: Dataset) -> list[Dataset]:
    """All matches of a C-FIND; raises PacsUnavailable/PacsTimeout, never hangs."""
    for attempt in (1, 2):
        assoc, reused = pool.acquire()
        started = time.monotonic()
        results: list[Dataset] = []
        ok = False
        try:
            with busy(assoc):
                responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind,
                                              msg_id=next_message_id())
                answers = list(responses)
            for status, ident in answers:
                code = getattr(status, "Status", None)
                if code is None:
                    raise lost("C-FIND", pool, started)
                if code in PENDING:
                    if ident is not None:
                        results.append(ident)
                    continue
                if code == 0x0000:
                    ok = True
                    break
                if code == 0xFE00:
                    raise PacsUnavailable("C-FIND was cancelled by the PACS")
                raise PacsUnavailable(f"C-FIND: PACS {pool.peer.aet} answered with failure status "
                                      f"0x{code:04X}")
            else:
                raise lost("C-FIND", pool, started)
        except (PacsUnavailable, PacsTimeout) as exc:
            abort(assoc)
            pool.release(assoc, reusable=False)
            if attempt == 1 and reused and not results and not isinstance(exc, PacsTimeout):
                log.debug("pooled association was stale; retrying C-FIND on a new one")
                continue
            raise
        except (RuntimeError, ValueError, OSError) as exc:
            abort(assoc)
            pool.release(assoc, reusable=False)
            if attempt == 1 and reused:
                continue
            raise PacsUnavailable(f"C-FIND: {exc}") from None
        finally:
            if ok:
                pool.release(assoc, reusable=True)
        return results
    raise AssertionError("unreachable")
