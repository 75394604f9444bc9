"""The node's WebSocket protocol for uvicorn: its sans-I/O `websockets` protocol, plus direct
frame writes offered to the app as the ASGI extension `rt.direct`.

A fan-out writes one message to thousands of sockets. Through plain ASGI every copy costs a
task switch and five awaits (Starlette, uvicorn, websockets framing). Here the push is framed
once (`realtime.protocol.wire_frame`: a server frame is never masked, so the same bytes are
valid on every connection) and written straight to each transport while it is writable. When it
is not (the peer reads slowly, the transport's buffer is over its high-water mark) the app
queues and goes through the normal ASGI `send`, which waits for the buffer to drain.

The extension is only advertised when no WebSocket extension (permessage-deflate) was
negotiated, since compressed frames differ per connection. An app that does not know it runs
unchanged on plain ASGI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

EXTENSION = "rt.direct"


class DirectWriter(Protocol):
    """What `scope["extensions"]["rt.direct"]["writer"]` offers."""

    def can_write(self) -> bool:
        """True while a frame written now goes straight out (open, not backpressured)."""
        ...

    def write_frame(self, wire: bytes) -> None:
        """Write a frame from `realtime.protocol.wire_frame` (after `can_write()` said yes)."""
        ...


def direct_writer(scope: Mapping[str, Any]) -> DirectWriter | None:
    ext = scope.get("extensions") or {}
    offered = ext.get(EXTENSION)
    writer: DirectWriter | None = None if offered is None else offered["writer"]
    return writer


class _Inbox:
    """The protocol's queue of ASGI receive events, for its one consumer (the app's
    `receive`). asyncio.Queue allocates three deques per connection; this, one list."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class _Flag:
    """asyncio.Event's interface without its per-instance deque (the `writable` flag)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if not self._set:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut
        return True


class RealtimeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `websockets-sansio` protocol with the `rt.direct` extension, and lighter
    per connection: an idle socket holds this object for hours."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None and not self.conn.extensions:
            # The app task is created but has not run yet: it sees the extension.
            scope["extensions"][EXTENSION] = {"writer": self}

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # The handshake is done: its request and response are garbage from now on.
            self.request = self.response = None  # type: ignore[assignment]

    def can_write(self) -> bool:
        return (
            self.handshake_complete
            and not self.close_sent
            and self.writable.is_set()
            and not self.disconnected
            and self.conn.state is State.OPEN
            and not self.transport.is_closing()
        )

    def write_frame(self, wire: bytes) -> None:
        self.transport.write(wire)
