"""The gateway's HTTP guard: the limits the project's servers share (``omi_dsf.serving.limits``:
header timeout and size in the protocol; query length, body size and read timeout, requests at once
in an ASGI middleware), and outermost a middleware through which no exception reaches the server's
log with its message (pydicom's and pynetdicom's messages quote values) or the request's path
(UIDs): it is logged by its type, its traceback lines and :func:`redact`'s path, and answered 500
in JSON naming that log line.
"""

from __future__ import annotations

import hashlib
import logging
import re

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from omi_dsf.serving.limits import LimitsMiddleware

from .config import GatewayLimits
from .logs import without_message

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health"}   # never counted, never refused for being busy
_UID_SEGMENT = re.compile(r"/[0-9][^/]*")


def redact(path: str) -> str:
    """A path fit for a log line: its UID (and frame list) segments replaced, plus a short hash
    of the whole path so that one request's lines can be found together."""
    digest = hashlib.sha256(path.encode("utf-8", "replace")).hexdigest()[:10]
    return f"{_UID_SEGMENT.sub('/{uid}', path)[:120]} [{digest}]"


def error_response(status: int, message: str) -> JSONResponse:
    """The gateway's error answer, also for the shared limits' refusals."""
    return JSONResponse({"status": status, "error": message}, status_code=status)


def limited(app, limits: GatewayLimits):
    """``app`` behind the shared limits and the exception log."""
    return ExceptionLog(LimitsMiddleware(app, limits, exempt=OPEN_PATHS.__contains__, respond=error_response))


class ExceptionLog:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:
            return
        except Exception as exc:  # noqa: BLE001 - logged without its message; the client gets a 500
            where = redact(scope.get("path", ""))
            log.error("%s %s: %s", scope.get("method"), where, without_message(exc))
            if not started:
                await error_response(500, f"internal error ({type(exc).__name__}); logged as "
                                          f"{where.rsplit('[', 1)[-1].rstrip(']')}")(scope, receive, send)
