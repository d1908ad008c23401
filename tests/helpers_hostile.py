"""What the hostile-input tests share: hypothesis strategies for odd JSON and odd text, mutations of a
valid document, raw-socket requests (half-sent headers and bodies) and a process's memory."""

from __future__ import annotations

import copy
import socket
import ssl
import time
from pathlib import Path

from hypothesis import strategies as st

# text an attacker or a careless client sends: control characters, terminal escapes, bidi overrides,
# unicode digits and superscripts, very long runs, path tricks
ODD_PIECES = ["\x00", "\x1b[2J", "\x1b]0;owned\x07", "\u202e", "\x9b31m", "²", "١٢٣", "..", "../", "%2e%2e/", "%00",
              "*", "?", "\\", "'", '"', "<script>", "\r\n", "nan", "1e400", "-1", "0" * 40, "9" * 400, "é", "𝟘"]
odd_text = st.one_of(st.text(max_size=40), st.sampled_from(ODD_PIECES),
                     st.lists(st.sampled_from(ODD_PIECES), min_size=1, max_size=6).map("".join))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=True, allow_infinity=True), odd_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)), max_leaves=12)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


_DELETE = object()


@st.composite
def mutated(draw, document, max_changes: int = 3):
    """`document` (JSON) with one to `max_changes` of its parts replaced by odd values, deleted, or
    wrapped in a list or an object: mostly valid around the change, so the server parses deep into it."""
    doc = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, max_changes))):
        path = draw(st.sampled_from(list(_paths(doc))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "list", "object"]))
        current = doc
        for p in path:
            current = current[p]
        if action == "delete" and path:
            value = _DELETE
        elif action == "list":
            value = [current]
        elif action == "object":
            value = {"value": current}
        else:
            value = draw(json_values)
        doc = _set(doc, path, value)
    return doc


def raw_request(port: int, data: bytes, *, tls: ssl.SSLContext | None = None, read: bool = True,
                timeout: float = 30.0) -> bytes:
    """Send `data` as it is on a new connection and return what the server answers until it closes
    (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        sock = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        sock.sendall(data)
        if not read:
            return b""
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
        return out


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0 when there was none)."""
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def signed_token(claims: dict, key, algorithm: str = "RS256") -> str:
    """A JWT with any claims, also ones pyjwt would refuse to encode (an `iss` that is a list), signed
    by `key`: only the claims can be what the server refuses."""
    import json

    import jwt

    return jwt.PyJWS().encode(json.dumps(claims).encode(), key, algorithm=algorithm)
