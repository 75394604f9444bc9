"""The peer: python-socketio's ASGI server with AsyncRedisManager (what a Python team would
otherwise pick), with the same semantics the benchmark needs: join a room, publish to it.

    RT_PEER_REDIS_URL=redis://... uvicorn loadtests.peers.socketio_server:app --port P
"""

from __future__ import annotations

import os
from typing import Any

import socketio

manager = socketio.AsyncRedisManager(os.environ.get("RT_PEER_REDIS_URL", "redis://127.0.0.1"))
# A generous ping timeout: under overload engine.io otherwise drops its own publisher
# (its event loop answers the ping too late) and loses the publishes not yet handled.
sio = socketio.AsyncServer(
    async_mode="asgi", client_manager=manager, cors_allowed_origins=[], ping_timeout=120
)
app = socketio.ASGIApp(sio)


@sio.on("join")  # type: ignore[untyped-decorator]
async def join(sid: str, room: str) -> bool:
    await sio.enter_room(sid, room)
    return True


@sio.on("publish")  # type: ignore[untyped-decorator]
async def publish(sid: str, data: dict[str, Any]) -> bool:
    await sio.emit("message", data, room=data["room"], skip_sid=sid)
    return True
