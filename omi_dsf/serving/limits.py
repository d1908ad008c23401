"""Bounded cost per request, and the uvicorn set-up of the project's servers.

`LimitsMiddleware` (pure ASGI, outermost): a path and query longer than `max_query_bytes` is 414; a
Content-Length above `max_body_mb` is 413 before any of the body is read; a body without length is
counted as it arrives and cut off at the limit (413); `body_timeout` seconds without body data is
408; more than `max_concurrent` requests in progress is 503 (with Retry-After). Paths named exempt
(health) are not counted, so they answer while the server is busy. Each refusal names its limit.

An answer given before the body was read (a refusal, 401, 404) closes the connection: a client
trickling the rest of a body cannot hold it afterwards.

uvicorn has no timeout for a request's headers and httptools no limit on their size: `uvicorn_config`
serves with a protocol subclass (for httptools or h11) that answers 408 and closes a connection whose
headers are not complete within `header_timeout`, and 431 once they pass `max_header_bytes` (slow,
half-sent or endless requests cannot pile up).
"""

from __future__ import annotations

import ssl
from typing import Any, Callable

import anyio
import uvicorn
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from omi_dsf.serving.config import Limits, TlsSettings

Respond = Callable[[int, str], Response]


class RequestLimitError(HTTPException):
    """A limit hit while the application reads the body; the connection is closed after the answer."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message, headers={"Connection": "close"})


def json_error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _mb(n: int) -> str:
    return f"{n / (1 << 20):g} MB"


class LimitsMiddleware:
    def __init__(self, app, limits: Limits, exempt: Callable[[str], bool] = lambda path: False,
                 respond: Respond = json_error):
        self.app, self.limits, self.exempt, self.respond = app, limits, exempt, respond
        self.active = 0

    async def _refuse(self, scope, receive, send, status: int, message: str, **headers):
        response = self.respond(status, message)
        response.headers["Connection"] = "close"   # the body (if any) stays unread
        for name, value in headers.items():
            response.headers[name.replace("_", "-")] = value
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lim = self.limits
        target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string") or b"")
        if target > lim.max_query_bytes:
            return await self._refuse(scope, receive, send, 414, f"request target of {target} bytes is longer "
                                      f"than limits.max_query_bytes ({lim.max_query_bytes})")
        lengths = {v for k, v in scope.get("headers") or [] if k == b"content-length"}
        if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
            return await self._refuse(scope, receive, send, 400, "Content-Length must be one number")
        if lengths and int(next(iter(lengths))) > lim.max_body:
            return await self._refuse(scope, receive, send, 413, f"request body of {int(next(iter(lengths)))} "
                                      f"bytes is larger than limits.max_body_mb ({_mb(lim.max_body)})")
        counted = not self.exempt(scope["path"])
        if counted and self.active >= lim.max_concurrent:
            return await self._refuse(scope, receive, send, 503, f"busy: more than limits.max_concurrent "
                                      f"({lim.max_concurrent}) requests at once; try again", Retry_After="1")
        received, body_done, started = 0, False, False
        has_body = bool(lengths - {b"0"}) or any(k == b"transfer-encoding" for k, _ in scope.get("headers") or [])

        async def limited_receive():
            nonlocal received, body_done
            if body_done:   # later receives wait for a disconnect, for as long as the answer takes
                return await receive()
            with anyio.move_on_after(lim.body_timeout) as scope_:
                message = await receive()
            if scope_.cancelled_caught:
                body_done = True   # the rest is not read; the answer closes the connection
                raise RequestLimitError(408, f"no request body data for {lim.body_timeout:g} s "
                                             "(limits.body_timeout)")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > lim.max_body:
                    body_done = True
                    raise RequestLimitError(413, f"request body larger than limits.max_body_mb ({_mb(lim.max_body)})")
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if has_body and not body_done:   # answered before the body was read: do not wait for the rest
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        if counted:
            self.active += 1
        try:
            await self.app(scope, limited_receive, watched_send)
        except RequestLimitError as exc:   # raised where no handler of the app saw it
            if started:
                raise
            await self._refuse(scope, receive, send, exc.status_code, exc.detail)
        finally:
            if counted:
                self.active -= 1


def limit_error_handler(respond: Respond):
    """A starlette exception handler answering a RequestLimitError (and any HTTPException) as `respond` does."""
    async def handler(request, exc: HTTPException) -> Response:
        response = respond(exc.status_code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response
    return handler


# -- uvicorn ------------------------------------------------------------------------------------------

def _refusal(status: bytes, message: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, len(message), message))


class _HeaderLimits:
    """Mixed into a uvicorn HTTP protocol: a connection whose request headers are not complete within
    `header_timeout` seconds (of its opening, or of the first byte of its next request) gets 408, one
    whose request line and headers pass `max_header_bytes` 431; either is closed. Idle keep-alive
    connections stay uvicorn's (timeout_keep_alive)."""

    header_timeout = 10.0
    max_header_bytes = 16384
    _late = None
    _head_bytes = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._late is None:
            self._head_bytes = 0
            self._late = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._late is not None:
            self._late.cancel()
            self._late = None

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():   # refused already: the rest is not read
            return
        before = self.cycle
        if before is None or before.response_complete:
            self._arm()
        waiting = self._late is not None
        super().data_received(data)
        if self.cycle is not before:   # a request's headers are complete
            self._disarm()
        elif waiting:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(b"431 Request Header Fields Too Large",
                             b"request line and headers larger than limits.max_header_bytes (%d)" % self.max_header_bytes)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._late = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self._refuse(b"408 Request Timeout", b"request headers not complete in time (limits.header_timeout)")

    def _refuse(self, status: bytes, message: bytes) -> None:
        self._disarm()
        if self.transport.is_closing():   # the parser refused first
            return
        self.transport.write(_refusal(status, message))
        self.transport.close()


def default_protocol() -> type:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        return HttpToolsProtocol
    except ImportError:   # pragma: no cover - httptools is a dependency
        from uvicorn.protocols.http.h11_impl import H11Protocol
        return H11Protocol


def with_header_limits(protocol: type, limits: Limits) -> type:
    return type(f"HeaderLimited{protocol.__name__}", (_HeaderLimits, protocol),
                {"header_timeout": limits.header_timeout, "max_header_bytes": limits.max_header_bytes})


def tls_kwargs(tls: TlsSettings | None) -> dict[str, Any]:
    """uvicorn's TLS settings: a client certificate is required (mutual TLS) or, with client_ca alone,
    asked for and verified when given."""
    if tls is None:
        return {}
    out: dict[str, Any] = {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile)}
    if tls.keyfile_password:
        out["ssl_keyfile_password"] = tls.keyfile_password
    if tls.client_ca:
        out["ssl_ca_certs"] = str(tls.client_ca)
        out["ssl_cert_reqs"] = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return out


def uvicorn_config(app, *, host: str, port: int, tls: TlsSettings | None, limits: Limits,
                   protocol: type | None = None, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, proxy_headers=False,
                          server_header=False, timeout_graceful_shutdown=5, lifespan="on",
                          http=with_header_limits(protocol or default_protocol(), limits),
                          # h11's own limit (a 400) only behind ours, for a single huge chunk
                          h11_max_incomplete_event_size=4 * limits.max_header_bytes, **tls_kwargs(tls))
