"""Several "hosts" on one machine for tests: each a Linux network namespace (needs root and `ip`)
with only its own loopback, that reaches chosen services of this machine through a TCP forwarder.

A process started in a host sees 127.0.0.1:PORT of that host; the forwarder (a process of this
machine's namespace, whose listening sockets were made inside the host's namespace) carries each
connection to 127.0.0.1:PORT here, so TLS names and URLs in configuration files stay the same.
`kill()` ends every process of the host and its forwarder at once, as a host that loses power.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000


def available() -> str | None:
    """None when hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "the `ip` program (iproute2) is missing"
    probe = f"omi-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Host:
    def __init__(self, name: str, ports: list[int], log: Path):
        self.name = f"omi-{name}-{os.getpid()}"
        self.ports, self.log = ports, log
        self.procs: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)
        self.forwarder = subprocess.Popen(
            [sys.executable, "-m", "omi_dsf.testkit.hosts", self.name, *map(str, ports)],
            stdout=log.open("ab"), stderr=subprocess.STDOUT)
        self._wait_forwarding()

    def _wait_forwarding(self, timeout: float = 20) -> None:
        probe = f"import socket; [socket.create_connection(('127.0.0.1', p), 2).close() for p in {self.ports!r}]"
        deadline = time.monotonic() + timeout
        while subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", probe],
                             capture_output=True).returncode:
            if self.forwarder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name}: forwarder did not come up, see {self.log}")
            time.sleep(0.2)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)
        self.procs.append(p)
        return p

    def kill(self) -> None:
        """SIGKILL the host's processes (started here, by id) and its forwarder."""
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for p in [*self.procs, self.forwarder]:
            if p.poll() is None:
                p.kill()
            p.wait(10)

    def remove(self) -> None:
        self.kill()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


# -- the forwarder (python -m omi_dsf.testkit.hosts NETNS PORT...) ---------------------------------


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(listener: socket.socket, port: int) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            out = socket.create_connection(("127.0.0.1", port), timeout=10)
            out.settimeout(None)
        except OSError:
            conn.close()
            continue
        for a, b in ((conn, out), (out, conn)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def main(netns: str, ports: list[int]) -> None:
    home = "/proc/self/ns/net"
    home_fd = os.open(home, os.O_RDONLY)     # to come back: this process's own namespace
    _setns(f"/var/run/netns/{netns}")
    listeners = []
    for port in ports:                        # made inside the host: they stay there
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        listeners.append((s, port))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(home_fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back")
    os.close(home_fd)
    threads = [threading.Thread(target=_serve, args=lp, daemon=True) for lp in listeners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main(sys.argv[1], [int(p) for p in sys.argv[2:]])
