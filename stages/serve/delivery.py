"""Tokens from the scheduler's thread to asyncio readers, one wake-up of their event loop per batch.

    send = outbox(asyncio.get_running_loop()).sender(queue)   # an asyncio.Queue the reader awaits
    scheduler.submit(prompt_ids, params, listener=send)

A reader thread per request, woken per token, costs a thread switch and a turn at the GIL for every token:
at 32 streams the scheduler's thread spent half its time handing tokens over. Asyncio readers share one
thread. The scheduler's thread appends to that loop's outbox; only the first item since the loop last
emptied it wakes the loop (`call_soon_threadsafe`), which then puts every item on its request's queue, in
the order they were sent. Inside `batched()` (the scheduler wraps each step in it) the wake-up waits for
the end of the block: a step's tokens for all its requests cost one wake-up of each loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopOutbox] = weakref.WeakKeyDictionary()
_outboxes_lock = threading.Lock()


class LoopOutbox:
    """Items bound for queues read on `loop`, kept until the loop takes them all at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()
        self._flush_pending = False

    def sender(self, reader: asyncio.Queue) -> Callable[[object], None]:
        """A callable for any thread that puts its argument on `reader` (on the loop's thread). It raises
        RuntimeError once the loop is closed: its reader is gone."""

        def send(item: object) -> None:
            self.send(reader, item)

        return send

    def send(self, reader: asyncio.Queue, item: object) -> None:
        with self._lock:
            if self._loop.is_closed():
                raise RuntimeError("the event loop reading this request is closed")
            self._items.append((reader, item))
            if self._flush_pending:
                return
            self._flush_pending = True
        deferred = getattr(_batch, "outboxes", None)
        if deferred is None:
            self._wake()
        else:
            deferred.append(self)

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # a loop closed since: its readers are gone
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._items, self._flush_pending = self._items, [], False
        for reader, item in items:
            reader.put_nowait(item)


_batch = threading.local()


@contextlib.contextmanager
def batched() -> Iterator[None]:
    """Within it, what this thread sends wakes each event loop once, when the block ends."""
    outer = getattr(_batch, "outboxes", None)
    if outer is not None:  # nested: the outer block wakes them
        yield
        return
    _batch.outboxes = []
    try:
        yield
    finally:
        boxes, _batch.outboxes = _batch.outboxes, None
        for box in boxes:
            box._wake()


def outbox(loop: asyncio.AbstractEventLoop) -> LoopOutbox:
    """The one outbox of `loop` (made at first use, gone with the loop)."""
    with _outboxes_lock:
        box = _outboxes.get(loop)
        if box is None:
            box = _outboxes[loop] = LoopOutbox(loop)
        return box


class LoopThread:
    """An event loop in a daemon thread of its own: synchronous callers read async token sources through it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def iterate(self, source: AsyncIterator[T]) -> Iterator[T]:
        """`source`'s items for a synchronous reader; `source` starts when the first item is asked for, and
        closing the iterator cancels it (its `finally` runs on the loop)."""
        items: queue.SimpleQueue = queue.SimpleQueue()

        async def pump() -> None:
            try:
                async for item in source:
                    items.put((True, item))
                items.put((False, None))
            except Exception as err:  # noqa: BLE001 - raised in the reader's thread
                items.put((False, err))

        running = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                more, item = items.get()
                if not more:
                    if item is not None:
                        raise item
                    return
                yield item
        finally:
            running.cancel()  # a no-op once it has ended

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
