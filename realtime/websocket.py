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


class RealtimeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `websockets-sansio` protocol with the `rt.direct` extension."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None and not self.conn.extensions:
            # The app task is created but has not run yet: it sees the extension.
            scope["extensions"][EXTENSION] = {"writer": self}

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
