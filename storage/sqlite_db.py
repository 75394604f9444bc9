"""The embedded store's plumbing: a SQLite connection owned by one thread, and transactions.

Each connection's thread runs its calls in order. The documents (alerts, their delivery jobs,
bans) are in a file of their own with threads of their own (`storage.sqlite`), so an SOS never
waits behind a queue of chat writes or reads.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .base import StoreUnavailable

T = TypeVar("T")
_Job = tuple[Callable[[sqlite3.Connection], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class Db:
    """A connection owned by one thread; every call runs there, in order."""

    def __init__(self, path: Path, name: str) -> None:
        self._path = path
        self._name = name
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._conn: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._ready:
            if self._closing:
                raise StoreUnavailable("sqlite: the store is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name=f"sqlite-{self._name}", daemon=True
                )
                self._thread.start()
            self._jobs.append((fn, loop, future))
            self._ready.notify()
        try:
            return await future
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            with self._ready:
                while not jobs and not self._closing:
                    self._ready.wait()
                if not jobs:
                    return  # closing, and nothing left to do
                fn, loop, future = jobs.popleft()
            if future.cancelled():
                continue  # its caller gave up (timeout) before it ran
            try:
                result: Any = fn(self.connect())
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome: tuple[Any, BaseException | None] = (None, exc)
            else:
                outcome = (result, None)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:
                pass  # the caller's loop is closed: nobody waits; the thread goes on for the rest

    async def close(self) -> None:
        def _close(_: sqlite3.Connection) -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._thread is not None:
            await self.run(_close)
        with self._ready:
            self._closing = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def transaction(db: sqlite3.Connection, work: Callable[[], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result
