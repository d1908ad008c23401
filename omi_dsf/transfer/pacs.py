"""C-STORE of re-identified results into the requester's legacy PACS (pynetdicom).

Site settings, `steps.pacs` in the site YAML (PacsSettings, omi_dsf.transfer.config). A PACS that rejects the association or refuses an
object for a reason retrying cannot fix is a TransferError; one that is down, out of resources or
drops the connection raises `PacsUnavailable` (retried).
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from omi_dsf.errors import RetryableError
from omi_dsf.transfer.config import PacsSettings
from omi_dsf.transfer.errors import TransferError

# pynetdicom logs association and DIMSE details (UIDs among them) at INFO and DEBUG.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class PacsUnavailable(ConnectionError, RetryableError):
    """The PACS did not take the objects now; a later attempt may succeed."""


def store_in_pacs(pacs: PacsSettings | None, datasets: Sequence[Dataset]) -> str:
    """C-STORE every dataset over one association; returns the PACS AE title (for the audit)."""
    if pacs is None:
        raise TransferError("site configuration steps.pacs is missing (host, port, ae_title)")
    host, port, called, calling, timeout = pacs.host, pacs.port, pacs.ae_title, pacs.calling_ae, pacs.timeout
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10)
    seen = set()
    for ds in datasets:
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ExplicitVRLittleEndian)
        key = (str(ds.SOPClassUID), ts)
        if key not in seen:
            seen.add(key)
            syntaxes = list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
            ae.add_requested_context(str(ds.SOPClassUID), syntaxes)
    for attempt in range(3):
        assoc = ae.associate(host, port, ae_title=called)
        if assoc.is_established or assoc.is_rejected:
            break
        # dcmqrscp now and then drops the connection instead of sending its A-ASSOCIATE-RJ; only
        # a few tries tell a PACS that refuses us from one that is down
        time.sleep(0.2 * (attempt + 1))
    if assoc.is_rejected:
        raise TransferError(f"the PACS {called} rejected the association (check steps.pacs ae_title and calling_ae)")
    if not assoc.is_established:
        raise PacsUnavailable(f"the PACS {called} at {host}:{port} does not answer")
    try:
        for n, ds in enumerate(datasets, 1):
            what = f"{ds.get('Modality', 'object')} (result {n} of {len(datasets)})"
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # no accepted presentation context for this SOP class
                raise TransferError(f"the PACS {called} does not accept {what}: no presentation context") from None
            if not status or "Status" not in status:
                raise PacsUnavailable(f"the PACS {called} dropped the connection while storing {what}")
            code = int(status.Status)
            if code == 0x0000 or code >> 12 == 0xB:
                continue  # success, or stored with a warning (coercion)
            if code >> 8 == 0xA7:
                raise PacsUnavailable(f"the PACS {called} is out of resources (status 0x{code:04X})")
            raise TransferError(f"the PACS {called} refused {what}: C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return called
