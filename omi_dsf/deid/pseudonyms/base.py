"""The interface every pseudonym provider offers."""

from __future__ import annotations

from typing import Protocol


class PseudonymError(Exception):
    """The provider could not answer (unreachable, refused, malformed reply)."""


class UnknownPseudonymError(PseudonymError):
    """The pseudonym (or domain) is not known to the provider: nothing to re-identify."""


class PseudonymProvider(Protocol):
    def pseudonymize(self, domain: str, value: str) -> str:
        """The pseudonym of `value` in `domain`, created on first use, the same ever after."""

    def depseudonymize(self, domain: str, pseudonym: str) -> str:
        """The original value; UnknownPseudonymError if the domain has no such pseudonym."""
