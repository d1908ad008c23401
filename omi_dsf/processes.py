"""The servers OMI starts as detached processes (the DSF test bed's, the FHIR store): is a pid still
that server, is a port on 127.0.0.1 free, the last lines of its log for an error message."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def pid_alive(pid: int | None, needle: str | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, with `needle`, its command line contains it."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if needle is not None:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            return needle in cmd
    except OSError:
        return False
    return True


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tail(path: Path, n: int = 20) -> str:
    """The last `n` lines of a text file joined with " | " ("" when unreadable)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])
