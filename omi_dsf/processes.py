"""The servers OMI starts as detached processes (the DSF test bed's, the FHIR store, a model server's
own ports): is a pid still that server, is a port on 127.0.0.1 free, a free port to give one, the
last lines of its log for an error message."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path


def pid_alive(pid: int | None, needle: str | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, with `needle`, its command line contains it.

    An empty command line counts as running: a process shows none while its image is being set up
    (for milliseconds after Popen returns, a java launcher that starts itself again, longer under
    load) and while it exits; only a command line without `needle` is another program."""
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
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            return not cmd or needle in cmd
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


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now and stays free: it lies below the kernel's
    ephemeral range, so no outgoing connection takes it as its source port while a test holds it
    in a configuration (a C-MOVE destination bound late failed with EADDRINUSE that way), and it
    is never handed out twice by this process."""
    low, _ = _ephemeral_range()
    first = 20000 if low > 21000 else 1024
    for _ in range(200):
        port = random.randrange(first, low) if low > first else 0
        if port in _handed_out:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _handed_out.add(port)
        return port
    raise OSError("no free TCP port below the ephemeral range")
