"""Pseudonym providers behind one interface: embedded (default), gPAS (SOAP), TTP-FHIR gateway."""

from .base import PseudonymError, PseudonymProvider, UnknownPseudonymError
from .factory import make_provider

__all__ = ["PseudonymError", "PseudonymProvider", "UnknownPseudonymError", "make_provider"]
