"""The child processes the tests, the demo and the benchmarks start (gateway, AI service, PACS,
workers): a free port for one (omi_dsf.processes.free_port, the one free-port helper), and
stopping one (ask, then insist)."""

from __future__ import annotations

import subprocess

from omi_dsf.processes import free_port  # noqa: F401  (here for the harness's users)


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
