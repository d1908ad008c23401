"""C-STORE of received (STOW-RS) instances on one association with the contexts they need."""

from __future__ import annotations

import logging
from io import BytesIO

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context

from ..errors import PacsUnavailable
from .association import Peer, abort, associate, next_message_id

log = logging.getLogger(__name__)

PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122


def c_store(calling_aet: str, peer: Peer, items: list[tuple[str, str, str, bytes]]) -> list[tuple[int, str]]:
    """Store ``(sop_class, sop_instance, transfer_syntax, part10_bytes)`` items.

    Returns one ``(status, comment)`` per item; raises PacsUnavailable when no association.
    """
    syntaxes: dict[str, list[str]] = {}
    for sop_class, _, ts, _ in items:
        wanted = syntaxes.setdefault(sop_class, [])
        for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in wanted:
                wanted.append(t)
    if len(syntaxes) > 128:
        raise PacsUnavailable("more than 128 different SOP classes in one request")
    contexts = [build_context(sc, tss) for sc, tss in syntaxes.items()]
    assoc = associate(calling_aet, peer, contexts)
    results: list[tuple[int, str]] = []
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for sop_class, _, _, data in items:
            if sop_class not in accepted:
                results.append((SOP_CLASS_NOT_SUPPORTED, "the PACS does not accept this SOP class"))
                continue
            if not assoc.is_established:
                results.append((PROCESSING_FAILURE, "the PACS dropped the association"))
                continue
            try:
                ds = dcmread(BytesIO(data))
                status = assoc.send_c_store(ds, msg_id=next_message_id())
            except (ValueError, RuntimeError, OSError) as exc:
                results.append((PROCESSING_FAILURE, f"C-STORE not sent: {str(exc)[:200]}"))
                continue
            code = getattr(status, "Status", None)
            if code is None:
                results.append((PROCESSING_FAILURE, "no answer from the PACS (timeout or abort)"))
            else:
                results.append((int(code), getattr(status, "ErrorComment", "") or ""))
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            abort(assoc)
    return results
