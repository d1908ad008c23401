"""Embedded pseudonyms: a keyed hash of the value, the pairs kept in the site store for reversal."""

from __future__ import annotations

import base64

from ..keys import derive
from ..store import SiteStore
from .base import UnknownPseudonymError

PREFIX = "PSN-"
LENGTH = 16  # base32 characters = 80 bits: collisions are out of reach for any hospital


class EmbeddedProvider:
    def __init__(self, key: bytes, store: SiteStore):
        self._key = key
        self._store = store

    def pseudonymize(self, domain: str, value: str) -> str:
        digest = derive(self._key, "pseudonym", domain, value)
        psn = PREFIX + base64.b32encode(digest).decode("ascii")[:LENGTH]
        return self._store.put_pseudonym(domain, value, psn)

    def depseudonymize(self, domain: str, pseudonym: str) -> str:
        value = self._store.value_for(domain, pseudonym)
        if value is None:
            raise UnknownPseudonymError(f"no pseudonym of that form in domain {domain!r}")
        return value
