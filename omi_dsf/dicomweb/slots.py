"""What the gateway's worker processes share: the association slots of each PACS and the mark a
STOW-RS leaves for the other workers' caches.

Slots: ``limit`` slot files in a folder; holding a slot is holding an exclusive ``flock`` on one of
them. The kernel releases the lock when the holder's descriptor closes, also when its process dies
(a killed worker leaks no slot, unlike a named semaphore). Within one process a slot is a
``threading.BoundedSemaphore`` when no folder is given (one worker).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class SlotsBusy(TimeoutError):
    """No slot came free in time."""


class Slots:
    """At most ``limit`` holders at once, across every process using the same ``folder``."""

    def __init__(self, limit: int, folder: Path | None = None, name: str = "slots"):
        self.limit = limit
        self._local = threading.BoundedSemaphore(limit)   # this process never asks for more
        self._paths = None
        if folder is not None:
            base = Path(folder) / name
            base.mkdir(parents=True, exist_ok=True)
            self._paths = [base / f"{i}.slot" for i in range(limit)]
            for p in self._paths:
                p.touch(exist_ok=True)

    def _grab(self) -> int | None:
        for path in self._paths:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """One slot for the block; SlotsBusy after ``timeout`` seconds without one."""
        deadline = time.monotonic() + timeout
        if not self._local.acquire(timeout=timeout):
            raise SlotsBusy(f"all {self.limit} slots busy")
        fd = None
        try:
            if self._paths is not None:
                pause = 0.002
                while (fd := self._grab()) is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise SlotsBusy(f"all {self.limit} slots busy")
                    time.sleep(min(pause, left))
                    pause = min(pause * 2, 0.05)
            yield
        finally:
            if fd is not None:
                os.close(fd)   # releases the lock
            self._local.release()


class ChangeMark:
    """A file other processes' caches check: ``touch()`` after a change, ``changed()`` tells
    whether any process touched it since this process last looked (the file only grows)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._seen = self._size()

    def _size(self) -> int:
        if self.path is None:
            return 0
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def touch(self) -> None:
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b".")
            finally:
                os.close(fd)

    def changed(self) -> bool:
        if self.path is None:
            return False
        now = self._size()
        if now == self._seen:
            return False
        self._seen = now
        return True
