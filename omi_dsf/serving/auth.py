"""Access control: mutual TLS (checked by the TLS layer), bearer JWTs (checked here), or anonymous.

A JWT must be signed by a configured issuer's key (PEM public key or certificate, or a JWKS file),
carry ``iss`` and ``exp`` and, when configured, the issuer's audience. Only public-key algorithms are
accepted. Whatever a token holds (an ``iss`` that is a list, a header that is not JSON, …), the
answer is a refusal (``jwt.InvalidTokenError``), never an error of the server.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable

import jwt
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)


class _Issuer:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        text = cfg.key_file.read_text()
        self.jwks: jwt.PyJWKSet | None = None
        self.key = None
        if text.lstrip().startswith("{"):
            self.jwks = jwt.PyJWKSet.from_dict(json.loads(text))
        else:
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import load_pem_public_key
            data = text.encode()
            if b"CERTIFICATE" in data:
                self.key = x509.load_pem_x509_certificate(data).public_key()
            else:
                self.key = load_pem_public_key(data)

    def key_for(self, token: str):
        if self.jwks is None:
            return self.key
        kid = jwt.get_unverified_header(token).get("kid")
        keys = self.jwks.keys
        if kid is not None:
            for k in keys:
                if k.key_id == kid:
                    return k.key
            raise jwt.InvalidTokenError("unknown key id")
        if len(keys) == 1:
            return keys[0].key
        raise jwt.InvalidTokenError("token has no key id")


def key_of(cfg: Any) -> _Issuer:
    """The key(s) of an issuer's `key_file`, loaded (errors: the file is not a key, certificate or JWKS)."""
    return _Issuer(cfg)


class TokenChecker:
    """`issuers`: objects with issuer, key_file (Path), audience and algorithms (serving.config.JwtIssuer)."""

    def __init__(self, issuers: Iterable[Any]):
        self.issuers = {i.issuer: _Issuer(i) for i in issuers}

    def check(self, token: str) -> dict:
        """The verified claims, or jwt.InvalidTokenError."""
        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError:
            raise jwt.InvalidTokenError("malformed token") from None
        if not isinstance(iss, str):
            raise jwt.InvalidTokenError("'iss' must be a string")
        issuer = self.issuers.get(iss)
        if issuer is None:
            raise jwt.InvalidTokenError("unknown issuer")
        options = {"require": ["exp", "iss"]}
        if issuer.cfg.audience is None:
            options["verify_aud"] = False
        try:
            return jwt.decode(token, issuer.key_for(token), algorithms=issuer.cfg.algorithms,
                              audience=issuer.cfg.audience, issuer=issuer.cfg.issuer,
                              options=options, leeway=30)
        except jwt.InvalidTokenError:
            raise
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError) as exc:   # odd claims or header values
            raise jwt.InvalidTokenError(f"malformed token ({type(exc).__name__})") from None


class TokenRefused(Exception):
    """A bearer credential refused; `error` is the OAuth error code for WWW-Authenticate."""

    def __init__(self, message: str, error: str = "invalid_request"):
        super().__init__(message)
        self.error = error


def claims_of(authorization: str, checker: TokenChecker | None) -> dict:
    """The verified claims of an ``Authorization: Bearer …`` value, or TokenRefused saying why."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenRefused("Authorization: only Bearer tokens are accepted")
    if checker is None:
        raise TokenRefused("bearer tokens are not configured here")
    try:
        return checker.check(token.strip())
    except jwt.InvalidTokenError as exc:
        log.info("bearer token refused: %s", type(exc).__name__)
        raise TokenRefused(f"bearer token refused: {exc}", "invalid_token") from None


def deny(message: str, realm: str, error: str = "invalid_request",
         respond: Callable[[int, str], Response] | None = None) -> Response:
    response = (respond or (lambda s, m: JSONResponse({"status": s, "error": m}, status_code=s)))(401, message)
    response.headers["WWW-Authenticate"] = f'Bearer realm="{realm}", error="{error}"'
    return response


class AuthMiddleware:
    """Pure ASGI (keeps streaming and client-disconnect handling intact). A request passes with a valid
    bearer token, or, when the handshake already verified a client certificate (`client_cert_required`),
    or when `anonymous`; `open_path(path)` names what needs nothing (health)."""

    def __init__(self, app, *, anonymous: bool, client_cert_required: bool, issuers: Iterable[Any],
                 open_path: Callable[[str], bool], realm: str,
                 respond: Callable[[int, str], Response] | None = None):
        self.app, self.anonymous, self.mtls = app, anonymous, client_cert_required
        issuers = list(issuers)
        self.checker = TokenChecker(issuers) if issuers else None
        self.open_path, self.realm, self.respond = open_path, realm, respond

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.open_path(scope["path"]):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        if header is not None:
            try:
                claims = claims_of(header.decode("latin-1"), self.checker)
            except TokenRefused as exc:
                return await deny(str(exc), self.realm, exc.error, self.respond)(scope, receive, send)
            scope.setdefault("state", {})["subject"] = claims.get("sub")
            return await self.app(scope, receive, send)
        if self.mtls or self.anonymous:  # with mTLS the handshake already verified the client
            return await self.app(scope, receive, send)
        return await deny("authentication required (bearer token or client certificate)", self.realm,
                          respond=self.respond)(scope, receive, send)
