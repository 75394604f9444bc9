"""A connection's outgoing frames, in order, in bounded memory.

Frames are written straight to the socket while it takes them (`rt.direct`,
realtime/websocket.py: a shared push is framed once for every socket); behind a full socket
they wait, in order, in a deque of at most `limit` that a flusher task sends through ASGI
(which waits while the socket's buffer is full). The frame being sent stays at the head of
the deque, so no direct write can overtake it. A consumer that falls further behind is
`overflow`ed (the connection closes it) instead of growing memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from .metrics import NodeMetrics
from .websocket import direct_writer


class Outbox:
    __slots__ = (
        "_binary",
        "_direct",
        "_flusher",
        "_limit",
        "_metrics",
        "_name",
        "_out",
        "_overflow",
        "_ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        binary: bool,
        limit: int,
        metrics: NodeMetrics,
        overflow: Callable[[], None],
        name: str,
    ) -> None:
        self._ws = ws
        self._name = name  # the flusher task's
        self._direct = direct_writer(ws.scope)
        self._binary = binary
        self._limit = limit
        self._metrics = metrics
        self._overflow = overflow
        self._out: deque[str | bytes] | None = None  # only behind a slow socket
        self._flusher: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Frames waiting behind a full socket."""
        return len(self._out) if self._out is not None else 0

    def direct(self) -> bool:
        """Whether a frame can go straight to the socket: nothing queued before it and the
        transport takes it without waiting."""
        direct = self._direct
        return direct is not None and not self._out and direct.can_write()

    def write(self, wire: bytes) -> None:
        """A complete WebSocket frame, after `direct()` said yes."""
        assert self._direct is not None
        self._direct.write_frame(wire)
        self._metrics.frames_out += 1

    def queue(self, data: str | bytes) -> None:
        """Behind a slow socket: wait in the bounded queue for the flusher."""
        if self._out is not None and len(self._out) >= self._limit:
            self._metrics.slow_consumers += 1
            self._overflow()
            return
        if self._out is None:
            self._out = deque()
        self._out.append(data)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name=self._name)

    async def _flush(self) -> None:
        ws = self._ws
        out = self._out
        assert out is not None
        try:
            while out:
                data = out[0]
                if self._binary:
                    await ws.send_bytes(data)  # type: ignore[arg-type]
                else:
                    await ws.send_text(data)  # type: ignore[arg-type]
                out.popleft()
                self._metrics.frames_out += 1
        except (WebSocketDisconnect, OSError, RuntimeError):
            out.clear()  # the socket is gone; its handler cleans up
        finally:
            self._flusher = None
            self._out = None

    async def drain(self, timeout_s: float | None) -> None:
        """Before the close frame: let the queue go out for up to `timeout_s` (None: not at
        all, a slow consumer), then stop the flusher."""
        flusher = self._flusher
        if flusher is None:
            return
        if timeout_s is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(flusher)
            except TimeoutError:
                pass
        flusher.cancel()
