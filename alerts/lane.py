"""The alert service's own lane: a thread with its own event loop (issue 21).

Under a chat flood a node's main event loop runs thousands of callbacks per turn, and every
await on any path waits a whole turn: an SOS that needs a dozen awaits (store, queue, worker,
provider) would wait a dozen turns. On the lane it waits for nothing but the GIL, which the
interpreter hands over within its switch interval. So the alert ops, the delivery workers, the
reconciler and the check-in timers run here, and the rest of the node reaches them only through
`Lane.run`; what the service needs from the node (publishing a push, asking who is online)
goes the other way through `Lane.back`.

Objects bound to one event loop (a pymongo or redis client) must be used on one side only: the
alert service gets its own store client when the store is MongoDB (`Node`), its own Redis
clients (the job queues and the responder index create theirs on first use, on the lane).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger("realtime.alerts")

T = TypeVar("T")
P = ParamSpec("P")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is its fallback
        return asyncio.new_event_loop()


class Lane:
    """A thread running an event loop. Until `start` (and after `stop`) `run` awaits the
    coroutine in the caller's loop, so a service used without a node (tests) needs no lane."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Start the thread (from the node's loop, which `back` then returns to)."""
        self._main = asyncio.get_running_loop()
        loop = _new_loop()
        ready = threading.Event()

        def work() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:  # what is still running on the lane is cancelled, as asyncio.run does
                left = asyncio.all_tasks(loop)
                for task in left:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=work, name=f"lane-{self.name}", daemon=True)
        self._thread.start()
        await asyncio.to_thread(ready.wait)
        self._loop = loop

    async def stop(self) -> None:
        """Stop the loop (what runs on it must have been stopped first) and join the thread."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the lane. Cancelling the caller cancels it there."""
        return await _on(self._loop, coro)

    def begin(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """`coro` started on the lane now, from the node's loop (not when the caller first
        awaits, as `run`); await the future for its result, cancel it to cancel `coro`."""
        loop = self._loop
        if loop is None:
            return asyncio.ensure_future(coro)
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def back(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """`fn` (a coroutine function of the node's) made callable from the lane: it runs on
        the loop that started the lane."""

        async def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return await fn(*args, **kwargs)

        async def on_main(*args: P.args, **kwargs: P.kwargs) -> T:
            main = self._main
            return await _on(
                None if main is None or main.is_closed() else main, call(*args, **kwargs)
            )

        return on_main


async def _on(loop: asyncio.AbstractEventLoop | None, coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` on `loop` (here, if it is this thread's loop or None)."""
    if loop is None or _running() is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def _running() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
