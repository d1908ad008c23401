"""Stopping the child processes OMI starts (gateway, AI service, workers): ask, then insist."""

from __future__ import annotations

import subprocess


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
