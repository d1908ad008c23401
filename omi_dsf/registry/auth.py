"""Who is calling: the provider organization behind a request.

Two ways in, both ending in a DSF organization identifier:
  mutual TLS  the client certificate (verified by the TLS layer against the configured CA); the
              organization comes from a configured mapping (SHA-512 thumbprint, as on the DSF allow
              list, or subject CN) or else from a subject attribute (default organizationIdentifier)
  bearer JWT  signed by a configured issuer's public key (pyjwt), `exp` and `iss` required, the
              organization in a configured claim

ASGI servers do not hand the peer certificate to the app, so the uvicorn protocol below notes it per
connection (keyed by the client address, which is what the app sees in scope["client"]).
"""

from __future__ import annotations

import hashlib
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier
from pydantic import Field
from uvicorn.protocols.http.h11_impl import H11Protocol

from omi_dsf.registry.errors import forbidden, unauthenticated
from omi_dsf.serving.auth import TokenChecker, TokenRefused, claims_of
from omi_dsf.config import Name, Section
from omi_dsf.serving.config import JwtIssuer

# (client host, client port) -> DER certificate of the connection's peer
PEER_CERTS: dict[tuple[str, int], bytes] = {}

ATTRIBUTES = {"organizationIdentifier": ObjectIdentifier("2.5.4.97"), "O": NameOID.ORGANIZATION_NAME,
              "CN": NameOID.COMMON_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME}


class PeerCertH11Protocol(H11Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self._peer_key = tuple(self.client) if self.client else None
        if der and self._peer_key:
            PEER_CERTS[self._peer_key] = der

    def connection_lost(self, exc) -> None:
        if getattr(self, "_peer_key", None):
            PEER_CERTS.pop(self._peer_key, None)
        super().connection_lost(exc)


class JwtProvider(JwtIssuer):
    organization_claim: Name = Field("organization", description="the claim naming the DSF organization")


class AuthSettings(Section):
    organizations: dict[str, str] = Field(default_factory=dict, description="client certificate (SHA-512 "
                                          "thumbprint or CN) → DSF organization identifier")
    cert_attribute: Literal["organizationIdentifier", "O", "CN", "OU"] | None = Field(
        "organizationIdentifier", description="the subject attribute naming the organization of an unmapped "
                                              "certificate (null: the mapping only)")
    jwt: list[JwtProvider] = Field(default_factory=list, description="bearer tokens these issuers sign are "
                                                                     "accepted")
    public_read: bool = Field(True, description="searches and the status page without authentication")


def thumbprint(der: bytes) -> str:
    return hashlib.sha512(der).hexdigest()


class Authenticator:
    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self.checker = TokenChecker(settings.jwt) if settings.jwt else None
        self.claims = {p.issuer: p.organization_claim for p in settings.jwt}

    def organization_from_cert(self, der: bytes) -> str:
        cert = x509.load_der_x509_certificate(der)
        cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        for key in [thumbprint(der), *cn]:
            if key in self.settings.organizations:
                return self.settings.organizations[key]
        attr = self.settings.cert_attribute
        if attr:
            values = cert.subject.get_attributes_for_oid(ATTRIBUTES[attr])
            if values:
                return str(values[0].value)
        raise forbidden(f"client certificate {cert.subject.rfc4514_string()!r} is not mapped to an organization")

    def organization(self, scope: dict, authorization: str | None) -> str:
        """The caller's organization, or a 401/403 FhirError."""
        if authorization:
            try:
                claims = claims_of(authorization, self.checker)
            except TokenRefused as exc:
                raise unauthenticated(str(exc)) from None
            org = claims.get(self.claims.get(claims.get("iss"), "organization"))
            if not isinstance(org, str) or not org:
                raise forbidden("bearer token carries no organization claim")
            return org
        client = scope.get("client")
        der = PEER_CERTS.get(tuple(client)) if client else None
        if der:
            return self.organization_from_cert(der)
        raise unauthenticated("authentication required: a client certificate or a bearer token")
