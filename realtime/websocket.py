"""The node's WebSocket protocol for uvicorn: its sans-I/O `websockets` protocol, plus direct
frame writes offered to the app as the ASGI extension `rt.direct`.

A fan-out writes one message to thousands of sockets. Through plain ASGI every copy costs a
task switch and five awaits (Starlette, uvicorn, websockets framing). Here the push is framed
once (`protocol.wire_frame`: a server frame is never masked, so the same bytes are
valid on every connection) and written straight to each transport while it is writable. When it
is not (the peer reads slowly, the transport's buffer is over its high-water mark) the app
queues and goes through the normal ASGI `send`, which waits for the buffer to drain.

The extension is only advertised when no WebSocket extension (permessage-deflate) was
negotiated, since compressed frames differ per connection. An app that does not know it runs
unchanged on plain ASGI.

Two limits uvicorn does not have. A closed socket whose peer stops reading is aborted after the
ping timeout, or `CLOSE_DRAIN_S` (asyncio flushes a closing transport with no time limit, so a
peer that never reads would keep the file, the buffer and the protocol forever). And
`HandshakeTimeoutProtocol` closes a TCP connection whose HTTP request (an upgrade, or any
request) is not complete within `RT_HANDSHAKE_TIMEOUT_S` (uvicorn's keep-alive timeout only
starts after a first response: a socket that sends nothing, or half a request head, is held
forever).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

EXTENSION = "rt.direct"
ARRIVAL = "rt.arrival"
# A closed socket still holding unsent bytes gets this long (or the ping timeout) for its peer
# to read them.
CLOSE_DRAIN_S = 10.0


class DirectWriter(Protocol):
    """What `scope["extensions"]["rt.direct"]["writer"]` offers."""

    def can_write(self) -> bool:
        """True while a frame written now goes straight out (open, not backpressured)."""
        ...

    def write_frame(self, wire: bytes) -> None:
        """Write a frame from `protocol.wire_frame` (after `can_write()` said yes)."""
        ...


def direct_writer(scope: Mapping[str, Any]) -> DirectWriter | None:
    ext = scope.get("extensions") or {}
    offered = ext.get(EXTENSION)
    writer: DirectWriter | None = None if offered is None else offered["writer"]
    return writer


Arrival = Callable[[dict[str, Any]], dict[str, Any] | None]


def arrival_hook(scope: Mapping[str, Any]) -> Callable[[Arrival], None] | None:
    """The ASGI extension `rt.arrival`: `hook(fn)` has the protocol call `fn(event)` in its
    read callback with each `websocket.receive` event that arrives while none is waiting for
    the app; what `fn` returns is what the app's `receive` gets, and None is nothing (the app
    dealt with the frame; reading goes on). (An app on another server gets None and reads
    frames as usual.)"""
    offered = (scope.get("extensions") or {}).get(ARRIVAL)
    hook: Callable[[Arrival], None] | None = None if offered is None else offered["hook"]
    return hook


class _Inbox:
    """The protocol's queue of ASGI receive events, for its one consumer (the app's
    `receive`). asyncio.Queue allocates three deques per connection; this, one list."""

    __slots__ = ("_arrival", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self._arrival: Arrival | None = None

    def hook(self, arrival: Arrival) -> None:
        self._arrival = arrival

    def arrive(self, event: dict[str, Any]) -> bool:
        """A received frame's event, through the arrival hook; False if the hook took it."""
        if self._arrival is not None and not self._items:
            taken = self._arrival(event)
            if taken is None:
                return False
            event = taken
        self.put_nowait(event)
        return True

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


class _DrainingTransport:
    """The transport, except that `close()` is final: when bytes are still buffered (the peer
    does not read), the transport is aborted if it has not closed `CLOSE_DRAIN_S` later."""

    __slots__ = ("_timer", "drain_s", "transport")

    def __init__(self, transport: asyncio.Transport, drain_s: float) -> None:
        self.transport = transport
        self.drain_s = drain_s
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        transport = self.transport
        transport.close()
        if self._timer is None and transport.get_write_buffer_size() > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.drain_s, transport.abort)

    def lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class RealtimeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `websockets-sansio` protocol with the `rt.direct` extension, and lighter
    per connection: an idle socket holds this object for hours."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inbox = _Inbox()
        self.queue = self.inbox  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self._raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        raw = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._raw = raw  # the direct path writes to it without the wrapper's lookup
        drain = self.ping_timeout or CLOSE_DRAIN_S  # as long as a pong may take
        self.transport = _DrainingTransport(raw, drain)  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        guard = self.transport
        if isinstance(guard, _DrainingTransport):
            guard.lost()
        super().connection_lost(exc)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is None:
            return
        # The app task is created but has not run yet: it sees the extensions.
        scope["extensions"][ARRIVAL] = {"hook": self.inbox.hook}
        if not self.conn.extensions:
            scope["extensions"][EXTENSION] = {"writer": self}

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # The handshake is done: its request and response are garbage from now on.
            self.request = self.response = None  # type: ignore[assignment]

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, except that a text frame that is not UTF-8 is closed 1007 quietly (uvicorn
        logs an ERROR with a traceback for each, which lets any client flood the logs), and
        that a frame the arrival hook takes (`rt.arrival`) is not queued and does not pause
        reading."""
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:  # past `websocket.close`: read on until the peer's close reply
            return
        event: dict[str, Any]
        if self.curr_msg_data_type == "text":
            try:
                event = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError:
                self.conn.send_close(1007, "invalid UTF-8")
                self.handle_parser_exception()
                return
        else:
            event = {"type": "websocket.receive", "bytes": data}
        if self.inbox.arrive(event) and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def can_write(self) -> bool:
        return (
            self.handshake_complete
            and not self.close_sent
            and self.writable.is_set()
            and not self.disconnected
            and self.conn.state is State.OPEN
            and self._raw is not None
            and not self._raw.is_closing()
        )

    def write_frame(self, wire: bytes) -> None:
        assert self._raw is not None
        self._raw.write(wire)


class HandshakeTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, but a request (head and body, or an upgrade's head) must be
    complete `handshake_timeout_s` after the connection opens or after the previous response;
    otherwise the connection is closed without an answer (slowloris, silent sockets). Use
    `handshake_protocol(seconds)` for a subclass with another timeout."""

    handshake_timeout_s: ClassVar[float] = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.handshake_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        super().handle_websocket_upgrade()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm()  # waiting for the next request (uvicorn's keep-alive runs too)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def handshake_protocol(timeout_s: float) -> type[HandshakeTimeoutProtocol]:
    """`HandshakeTimeoutProtocol` with this timeout (uvicorn builds protocols itself)."""
    return type(
        "HandshakeTimeoutProtocol", (HandshakeTimeoutProtocol,), {"handshake_timeout_s": timeout_s}
    )
