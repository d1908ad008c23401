"""Text from elsewhere (a server, a file) made safe to print on a terminal."""

from __future__ import annotations

import re

# C0 and C1 control characters (terminal escapes start with ESC or CSI) and the bidirectional
# overrides that reorder what a terminal shows; newline and tab are layout, kept where text is multi-line
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, lines: bool = True) -> str:
    """`text` (e.g. from a server) safe to print on a terminal: control characters and terminal escapes
    as visible escapes (ESC as \\x1b); with `lines` False also newlines and tabs (one line)."""
    out = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return out if lines else out.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
