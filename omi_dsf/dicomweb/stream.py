"""Bridge a blocking producer (a C-GET running in a thread) to an async consumer (the HTTP answer).

The queue between them is small, so memory does not grow with the study: a slow client slows the
C-STORE sub-operations down instead of piling instances up. Closing the consumer (a client that
went away) sets the producer's token; the DIMSE code then gives up its association (C-CANCEL and
release, or abort).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any, Callable

from .errors import PacsTimeout

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The consumer is gone; the producer should stop."""


class CancelToken:
    """Set once the consumer is gone; producers check it between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        self._event.set()


Emit = Callable[[Any], None]
Producer = Callable[[Emit, CancelToken], Any]

_END = object()


class ThreadStream:
    """Run ``producer(emit, token)`` in a thread; iterate what it emits with ``async for``.

    ``emit`` returns at once while there is room (at most ``maxsize`` items wait): the producer
    never waits for the event loop, which keeps the loop off the DIMSE critical path.
    """

    def __init__(self, producer: Producer, maxsize: int = 4, stall_timeout: float = 60.0,
                 name: str = "dicomweb-producer"):
        self._producer = producer
        self._stall = stall_timeout
        self._name = name
        self.token = CancelToken()
        self.result: Any = None
        self._items: deque = deque()
        self._space = threading.Semaphore(maxsize)
        self._ready: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done = False
        self._waiting = False   # the consumer sleeps on _ready: only then is a wake-up needed
        self._thread: threading.Thread | None = None

    def _wake(self) -> None:
        assert self._loop is not None and self._ready is not None
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # event loop closed
            self.token.cancel()

    def _put(self, item: Any) -> None:
        while not self._space.acquire(timeout=0.25):
            if self.token.cancelled:
                raise Cancelled()
        if self.token.cancelled:
            raise Cancelled()
        self._items.append(item)
        if self._waiting:  # (read after the append: a consumer that missed the item is waiting)
            self._wake()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self.result = self._producer(self._put, self.token)
        except Cancelled:
            return
        except BaseException as exc:  # handed to the consumer
            error = exc
        self._items.append((_END, error))  # the end marker needs no room
        self._wake()

    def start(self) -> "ThreadStream":
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    async def next(self) -> Any:
        """The next item; raises StopAsyncIteration at the end, or the producer's error."""
        if self._done:
            raise StopAsyncIteration
        assert self._ready is not None
        while not self._items:
            self._waiting = True
            self._ready.clear()
            if self._items:
                self._waiting = False
                break
            try:
                await asyncio.wait_for(self._ready.wait(), self._stall)
            except asyncio.TimeoutError:
                self.cancel()
                raise PacsTimeout(f"no data from the source for {self._stall:.0f} s") from None
            finally:
                self._waiting = False
        item = self._items.popleft()
        if isinstance(item, tuple) and len(item) == 2 and item[0] is _END:
            self._done = True
            if item[1] is not None:
                raise item[1]
            raise StopAsyncIteration
        self._space.release()
        return item

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.next()

    def cancel(self) -> None:
        self._done = True
        self.token.cancel()
