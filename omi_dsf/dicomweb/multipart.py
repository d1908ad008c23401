"""multipart/related (RFC 2387) for WADO-RS answers and STOW-RS requests; media-type headers."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from .errors import BadRequest

CRLF = b"\r\n"


@dataclass
class MediaType:
    mime: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def type_param(self) -> str | None:
        t = self.params.get("type")
        return t.lower() if t else None


def _split_params(text: str) -> list[str]:
    """Split on ';' outside double quotes."""
    parts, buf, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts]


def parse_media_type(text: str) -> MediaType:
    pieces = _split_params(text)
    mt = MediaType(pieces[0].strip().lower())
    for piece in pieces[1:]:
        if not piece:
            continue
        name, eq, value = piece.partition("=")
        if not eq:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
            value = value[1:-1]
        name = name.strip().lower()
        if name == "q":
            try:
                mt.q = float(value)
            except ValueError:
                raise BadRequest(f"Accept: bad q value {value[:20]!r}") from None
        else:
            mt.params[name] = value
    return mt


def _split_accept(header: str) -> list[str]:
    items, buf, quoted = [], [], False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    items.append("".join(buf))
    return [i.strip() for i in items if i.strip()]


def parse_accept(header: str | None) -> list[MediaType]:
    """Media ranges from an Accept header, best first; an empty header accepts anything."""
    if not header or not header.strip():
        return [MediaType("*/*")]
    types = [parse_media_type(item) for item in _split_accept(header)]
    return sorted((t for t in types if t.q > 0), key=lambda t: -t.q)


def new_boundary() -> str:
    return "omi-" + secrets.token_hex(16)


def content_type(boundary: str, part_type: str, transfer_syntax: str | None = None) -> str:
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def part_head(boundary: str, part_type: str, location: str | None = None,
              transfer_syntax: str | None = None) -> bytes:
    ct = part_type + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")
    head = f"--{boundary}\r\nContent-Type: {ct}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return head.encode("ascii") + CRLF


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def parse_multipart(body: bytes, boundary: str, max_parts: int = 100000) -> list[Part]:
    """Split a multipart body; raises :class:`BadRequest` for a malformed one."""
    if not boundary or len(boundary) > 200:
        raise BadRequest("Content-Type: missing or bad multipart boundary")
    delim = b"--" + boundary.encode("latin-1")
    start = body.find(delim)
    if start < 0:
        raise BadRequest("multipart body: boundary not found")
    parts: list[Part] = []
    pos = start + len(delim)
    while True:
        if body[pos:pos + 2] == b"--":
            break  # closing delimiter
        eol = body.find(CRLF, pos)
        if eol < 0:
            raise BadRequest("multipart body: truncated after a boundary")
        pos = eol + 2
        head_end = body.find(CRLF + CRLF, pos)
        if body[pos:pos + 2] == CRLF:  # a part without headers
            head_end, head = pos - 2, b""
        elif head_end < 0:
            raise BadRequest("multipart body: part headers not terminated")
        else:
            head = body[pos:head_end]
        headers = {}
        for line in head.split(CRLF):
            if not line.strip():
                continue
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise BadRequest("multipart body: bad part header line")
            headers[name.strip().lower()] = value.strip()
        data_start = head_end + 4
        nxt = body.find(CRLF + delim, data_start)
        if nxt < 0:
            raise BadRequest("multipart body: closing boundary missing")
        parts.append(Part(headers, body[data_start:nxt]))
        if len(parts) > max_parts:
            raise BadRequest(f"multipart body: more than {max_parts} parts")
        pos = nxt + 2 + len(delim)
    return parts
