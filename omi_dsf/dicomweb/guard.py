"""Limits that hold whatever a client sends: in the HTTP protocol (header read timeout, URL and
header size) and around the application (concurrent requests, body read timeout, no
exception escapes to the server's log with patient data in it).

uvicorn's httptools protocol has no header timeout and no size limit: a client that sends half a
request line holds its connection for ever, and one that sends endless headers grows a list.
:func:`protocol_class` subclasses it: every request must have its headers complete within
``header_timeout`` seconds of its first byte (of the connection, for the first one), else 408
and the connection is closed; a URL longer than ``max_url_bytes`` is a 414, headers larger
than ``max_header_bytes`` a 431 (both close the connection: the rest of the request is not read).

:class:`LimitsMiddleware` (pure ASGI, outermost) answers 503 past ``max_requests`` requests at
once (``/health`` is never counted or refused), a 408 when the body stalls for ``body_timeout``
seconds between two reads, and closes the connection when the answer goes out before the body
was read (a trickling client cannot hold it afterwards). An exception from the application is
logged by its type and a short hash of the path, never its message or the path itself (UIDs),
and answered 500 in JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re

from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .config import GatewayConfig
from .errors import RequestTimeout
from .logs import without_message

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health"}
DRAIN_BYTES, DRAIN_SECONDS = 1 << 20, 0.5   # the rest of a body read to keep the connection
_UID_SEGMENT = re.compile(r"/[0-9][^/]*")


def redact(path: str) -> str:
    """A path fit for a log line: its UID (and frame list) segments replaced, plus a short hash
    of the whole path so that one request's lines can be found together."""
    digest = hashlib.sha256(path.encode("utf-8", "replace")).hexdigest()[:10]
    return f"{_UID_SEGMENT.sub('/{uid}', path)[:120]} [{digest}]"


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"status": status, "error": message}).encode()


def protocol_class(cfg: GatewayConfig) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the gateway's header timeout and size limits."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer = None
        _refusal: tuple[int, str] | None = None
        _head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(cfg.header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False   # a pipelined request is late: close after this answer
                return
            self._refuse(408, f"request headers not received within header_timeout ({cfg.header_timeout:g} s)")

        def _refuse(self, status: int, message: str) -> None:
            """Answer ``status`` now and close the connection (nothing after it is read)."""
            self._refusal = (status, message)
            self._disarm()
            self.send_400_response(message)

        def send_400_response(self, msg: str) -> None:   # also uvicorn's answer to a parser error
            status, msg = self._refusal or (400, "malformed HTTP request")
            body = error_body(status, msg)
            self.transport.write(b"".join([
                STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]))
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            if self._head_timer is None:   # a later request on a kept-alive connection
                self._arm()

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > cfg.max_url_bytes:
                self._refusal = (414, f"URL longer than max_url_bytes ({cfg.max_url_bytes} bytes)")
                raise ValueError("URL too long")   # stops the parser; answered by send_400_response

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > cfg.max_header_bytes:
                self._refusal = (431, f"request headers larger than max_header_bytes ({cfg.max_header_bytes} bytes)")
                raise ValueError("headers too large")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():   # refused already: ignore the rest
                return
            super().data_received(data)

    return GuardedHttpToolsProtocol


class LimitsMiddleware:
    def __init__(self, app, cfg: GatewayConfig):
        self.app = app
        self.cfg = cfg
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] in OPEN_PATHS:
            return await self._run(scope, receive, send)
        if self.active >= self.cfg.max_requests:
            headers = [(b"retry-after", b"1")]
            if scope["method"] not in ("GET", "HEAD"):   # its body is not read
                headers.append((b"connection", b"close"))
            return await self._answer(send, 503, f"more than max_requests ({self.cfg.max_requests}) "
                                                 "requests at once; try again", headers)
        self.active += 1
        try:
            await self._run(scope, receive, send)
        finally:
            self.active -= 1

    async def _run(self, scope, receive, send):
        body_done = not any(name in (b"content-length", b"transfer-encoding") and value != b"0"
                            for name, value in scope.get("headers") or ())
        stalled = started = False
        timeout = self.cfg.body_timeout

        async def guarded_receive():
            nonlocal body_done, stalled
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                stalled = True   # the rest is not read; the answer closes the connection
                raise RequestTimeout(f"request body stalled for more than body_timeout ({timeout:g} s)") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def drain() -> bool:
            """Read (and drop) a small rest of the body that is already on its way, so that the
            connection can serve the next request; False when it is not that."""
            budget = DRAIN_BYTES
            try:
                while not body_done and budget > 0:
                    budget -= len((await asyncio.wait_for(guarded_receive(), DRAIN_SECONDS)).get("body", b""))
            except (asyncio.TimeoutError, RequestTimeout):
                return False
            return body_done

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if stalled or not (body_done or await drain()):   # answered before the body came
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ClientDisconnect:
            return
        except Exception as exc:  # noqa: BLE001 - logged without its message; the client gets a 500
            where = redact(scope.get("path", ""))
            log.error("%s %s: %s", scope.get("method"), where, without_message(exc))
            if not started:
                await self._answer(guarded_send, 500, f"internal error ({type(exc).__name__}); logged as "
                                                      f"{where.rsplit('[', 1)[-1].rstrip(']')}")

    @staticmethod
    async def _answer(send, status: int, message: str, headers: list | None = None) -> None:
        body = error_body(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": body})
