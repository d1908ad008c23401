"""The child processes the tests, the demo and the benchmarks start (gateway, AI service, PACS,
workers): a free port for one, and stopping one (ask, then insist)."""

from __future__ import annotations

import random
import socket
import subprocess


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and stays free: it lies below the kernel's
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
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _handed_out.add(port)
        return port
    raise OSError("no free TCP port below the ephemeral range")


def stop(proc: subprocess.Popen | None, grace: float = 10.0, kill: bool = False) -> None:
    """SIGTERM (SIGKILL with `kill`), wait up to `grace` seconds, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.kill() if kill else proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class ChildProcess:
    """A server OMI runs as a child process: `start()` returns once it serves; a context manager."""

    proc: subprocess.Popen | None = None

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        stop(self.proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
