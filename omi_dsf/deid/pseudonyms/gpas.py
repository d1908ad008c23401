"""gPAS (THS Greifswald) over SOAP: PSNManagerBeanService, getOrCreatePseudonymFor / getValueFor.

zeep parses the WSDL and the replies with entity expansion and network access for DTDs forbidden
(its default `Settings(forbid_entities=True, forbid_external=True)`), which we set explicitly.
zeep's transport speaks requests only: the session comes from the peer (Peer.requests_session).
"""

from __future__ import annotations

from zeep import Client, Settings
from zeep.exceptions import Error as ZeepError, Fault
from zeep.transports import Transport

from omi_dsf.peer import Peer

from .base import PseudonymError, UnknownPseudonymError

SERVICE_PATH = "gpas/gpasService?wsdl"
# Fault texts gPAS uses for "not there": an unknown domain or value / pseudonym.
_UNKNOWN_MARKERS = ("UnknownDomainException", "UnknownValueException", "InvalidPSNException",
                    "UnknownPSNException", "not found", "unknown")


class GpasProvider:
    def __init__(self, peer: Peer):
        wsdl_url, timeout = peer.url, peer.timeout
        session = peer.requests_session()
        transport = Transport(session=session, timeout=timeout, operation_timeout=timeout)
        settings = Settings(strict=False, forbid_dtd=True, forbid_entities=True, forbid_external=True)
        try:
            self._client = Client(wsdl_url, transport=transport, settings=settings)
        except (ZeepError, OSError) as exc:
            raise PseudonymError(f"gPAS WSDL not loadable from {wsdl_url}: {type(exc).__name__}") from None

    def pseudonymize(self, domain: str, value: str) -> str:
        return self._call("getOrCreatePseudonymFor", value=value, domainName=domain)

    def depseudonymize(self, domain: str, pseudonym: str) -> str:
        return self._call("getValueFor", psn=pseudonym, domainName=domain)

    def _call(self, operation: str, **params) -> str:
        try:
            result = getattr(self._client.service, operation)(**params)
        except Fault as fault:
            kind = _fault_kind(fault)
            text = f"{kind} {fault.message or ''}"
            if any(m.lower() in text.lower() for m in _UNKNOWN_MARKERS):
                raise UnknownPseudonymError(f"gPAS {operation} in domain {params['domainName']!r}: {kind}") from None
            raise PseudonymError(f"gPAS {operation} failed: {kind}") from None
        except (ZeepError, OSError) as exc:
            raise PseudonymError(f"gPAS {operation} failed: {type(exc).__name__}") from None
        if not result:
            raise PseudonymError(f"gPAS {operation} returned nothing")
        return str(result)


def _fault_kind(fault: Fault) -> str:
    """The exception name from the fault detail (gPAS puts e.g. <ns:UnknownDomainException> there).

    The fault string itself may echo the value asked for, so it never goes into our messages.
    """
    detail = fault.detail
    if detail is not None and len(detail):
        return detail[0].tag.rsplit("}", 1)[-1]
    return "SOAP fault"
