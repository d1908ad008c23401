"""Access control: mutual TLS (checked by the TLS layer), bearer JWTs (checked here), or anonymous.

A JWT must be signed by a configured issuer's key (PEM public key or JWKS file), carry ``iss`` and
``exp``, and, when configured, the issuer's audience. Only public-key algorithms are accepted.
"""

from __future__ import annotations

import logging

import jwt
from starlette.responses import JSONResponse

from omi_dsf.serving.auth import TokenChecker   # shared with the registry and the AI service

from .config import GatewayConfig

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health"}


def _deny(message: str, error: str = "invalid_request") -> JSONResponse:
    return JSONResponse({"status": 401, "error": message}, status_code=401,
                        headers={"WWW-Authenticate": f'Bearer realm="omi-gateway", error="{error}"'})


class AuthMiddleware:
    """Pure ASGI (keeps streaming and client-disconnect handling intact)."""

    def __init__(self, app, cfg: GatewayConfig):
        self.app = app
        self.anonymous = cfg.auth.anonymous
        self.mtls = bool(cfg.tls and cfg.tls.require_client_cert)
        self.checker = TokenChecker(cfg.auth.jwt) if cfg.auth.jwt else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        if header is not None:
            scheme, _, token = header.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return await _deny("Authorization: only Bearer tokens are accepted")(scope, receive, send)
            if self.checker is None:
                return await _deny("bearer tokens are not configured on this gateway")(scope, receive, send)
            try:
                claims = self.checker.check(token.strip())
            except (jwt.InvalidTokenError, jwt.PyJWKError, ValueError, TypeError, KeyError) as exc:
                # (odd header or claim shapes: a list as "kid", a number as "aud", …)
                log.info("bearer token refused: %s", type(exc).__name__)
                why = str(exc)[:200] if isinstance(exc, jwt.InvalidTokenError) else "malformed token"
                return await _deny(f"bearer token refused: {why}", "invalid_token")(scope, receive, send)
            scope.setdefault("state", {})["subject"] = claims.get("sub")
            return await self.app(scope, receive, send)
        if self.mtls or self.anonymous:  # with mTLS the handshake already verified the client
            return await self.app(scope, receive, send)
        return await _deny("authentication required (bearer token or client certificate)")(scope, receive, send)
