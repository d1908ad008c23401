"""Serve a stdlib request handler on 127.0.0.1 for the length of a test (stand-ins for remote
services that cannot run here: gPAS, gICS, a TTP-FHIR gateway)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class StandIn(BaseHTTPRequestHandler):
    """A stand-in's request handler: `_send` answers with a body (a JSON-able object or bytes)."""

    def _send(self, status: int, body, content_type: str = "application/fhir+json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serve(handler_cls) -> Iterator[str]:
    """The base URL of a server running `handler_cls` on a free port; stopped on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    # shutdown() waits for serve_forever's next poll: a short poll keeps every test's exit short
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
