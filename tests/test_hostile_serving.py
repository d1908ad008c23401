"""omi_dsf/serving's limits as such (issue 16), on a bare ASGI app: requests at once (health exempt),
Content-Length that is not one number, a body cut off at the limit or stalled, each answer naming its
limit. The servers' own tests (test_hostile_ai_service.py, test_hostile_registry.py) run them for real."""

from __future__ import annotations

import anyio
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from omi_dsf.serving.config import Limits
from omi_dsf.serving.limits import LimitsMiddleware, RequestLimitError


def _scope(path="/work", headers=(), query=b"") -> dict:
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": query,
            "headers": [(k.encode(), v.encode()) for k, v in headers], "http_version": "1.1"}


async def _call(mw, scope, chunks=(b"",), delay: float = 0.0):
    """(status, headers, body) of one request whose body arrives in `chunks`, `delay` seconds apart."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        if delay:
            await anyio.sleep(delay)
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await mw(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body.decode()


async def _reader(scope, receive, send):
    """An app that reads the whole body; a limit hit while reading propagates (no handler here)."""
    body = await Request(scope, receive).body()
    await PlainTextResponse(f"read {len(body)}")(scope, receive, send)


def test_requests_at_once_are_limited_and_health_is_exempt():
    gate = anyio.Event()

    async def app(scope, receive, send):
        if scope["path"] == "/work":
            await gate.wait()
        await PlainTextResponse("done")(scope, receive, send)

    mw = LimitsMiddleware(app, Limits(max_concurrent=2), exempt=lambda p: p == "/health")
    results = []

    async def main():
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(lambda: _append(results, _call(mw, _scope())))
            await anyio.sleep(0.05)
            busy = await _call(mw, _scope())
            health = await _call(mw, _scope("/health"))
            gate.set()
        return busy, health

    busy, health = anyio.run(main)
    assert busy[0] == 503 and b"retry-after" in busy[1] and "limits.max_concurrent (2)" in busy[2]
    assert health[0] == 200 and [r[0] for r in results] == [200, 200] and mw.active == 0


async def _append(results, coro):
    results.append(await coro)


@pytest.mark.parametrize("lengths", [["12a"], ["5", "6"], ["-1"], ["²"]])
def test_content_length_must_be_one_number(lengths):
    mw = LimitsMiddleware(_reader, Limits())
    status, headers, body = anyio.run(_call, mw, _scope(headers=[("content-length", v) for v in lengths]))
    assert status == 400 and "Content-Length must be one number" in body and headers[b"connection"] == b"close"


def test_body_cut_off_at_the_limit_and_a_stalled_body():
    limits = Limits(max_body_mb=1, body_timeout=0.2)
    mw = LimitsMiddleware(_reader, limits)
    status, _, body = anyio.run(_call, mw, _scope(), [b"x" * (600 << 10)] * 2)
    assert status == 413 and "limits.max_body_mb (1 MB)" in body
    status, _, body = anyio.run(_call, mw, _scope(), [b"x" * 100, b"y"], 0.5)
    assert status == 408 and "limits.body_timeout" in body
    status, _, body = anyio.run(_call, mw, _scope(), [b"x" * 100, b"y"], 0.05)
    assert (status, body) == (200, "read 101")


def test_limit_error_is_an_http_exception_closing_the_connection():
    exc = RequestLimitError(413, "too big")
    assert exc.status_code == 413 and exc.headers == {"Connection": "close"}
