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


class Slot:
    """One held slot: its locked file descriptor (None within one process)."""
    __slots__ = ("fd",)

    def __init__(self, fd: int | None):
        self.fd = fd


class Slots:
    """At most ``limit`` holders at once, across every process using the same ``folder``.

    Holders that can give their slot back on demand (an association pool's idle associations)
    register ``on_busy``: whoever waits for a slot calls them in its own process (every 50 ms while it
    waits), and with a folder touches ``pressure`` there, which a thread in each other process
    watches and answers by calling its callbacks; so idle associations make room for work in any
    worker process."""

    def __init__(self, limit: int, folder: Path | None = None, name: str = "slots"):
        self.limit = limit
        self._local = threading.BoundedSemaphore(limit)   # this process never asks for more
        self._paths = None
        self._pressure: Path | None = None
        self._on_busy: list = []
        self._watcher: threading.Thread | None = None
        if folder is not None:
            base = Path(folder) / name
            base.mkdir(parents=True, exist_ok=True)
            self._paths = [base / f"{i}.slot" for i in range(limit)]
            for p in self._paths:
                p.touch(exist_ok=True)
            self._pressure = base / "pressure"
            self._pressure.touch(exist_ok=True)

    def on_busy(self, callback) -> None:
        """``callback()`` gives back slots held idle; called when some holder waits for a slot."""
        self._on_busy.append(callback)
        if self._pressure is not None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="slots-pressure", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        seen = self._pressure_mark()
        while True:
            time.sleep(0.05)
            mark = self._pressure_mark()
            if mark != seen:
                seen = mark
                self._relieve()

    def _pressure_mark(self) -> int:
        try:
            return os.stat(self._pressure).st_mtime_ns
        except OSError:
            return 0

    def _relieve(self) -> None:
        for callback in list(self._on_busy):
            callback()

    def _busy(self) -> None:
        self._relieve()
        if self._pressure is not None:
            try:
                os.utime(self._pressure)
            except OSError:
                pass

    def _grab(self) -> int | None:
        for path in self._paths:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None

    def take(self, timeout: float = 0.0, relieve: bool = True) -> Slot | None:
        """A slot, or None after ``timeout`` seconds (0: only if one is free now). With
        ``relieve``, while it waits it asks idle holders everywhere to give theirs back (every 50 ms)."""
        deadline = time.monotonic() + timeout
        local, pause, asked = False, 0.002, float("-inf")
        while True:
            local = local or self._local.acquire(blocking=False)
            if local:
                fd = None if self._paths is None else self._grab()
                if self._paths is None or fd is not None:
                    return Slot(fd)
            now = time.monotonic()
            if now >= deadline:
                if local:
                    self._local.release()
                return None
            if relieve and now - asked >= 0.05:
                self._busy()
                asked = now
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.05)

    def give(self, slot: Slot) -> None:
        if slot.fd is not None:
            os.close(slot.fd)   # releases the lock
            slot.fd = None
        self._local.release()

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """One slot for the block; SlotsBusy after ``timeout`` seconds without one."""
        slot = self.take(timeout)
        if slot is None:
            raise SlotsBusy(f"all {self.limit} slots busy")
        try:
            yield
        finally:
            self.give(slot)


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
