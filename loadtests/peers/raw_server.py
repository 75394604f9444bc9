"""The ceiling: a minimal `websockets` broadcast server with no protocol to speak of.
"sub ROOM" joins a room; "pub ROOM PAYLOAD" sends PAYLOAD to everyone in the room (the
sender too, if it joined).

    python -m realtime_safety.loadtests.peers.raw_server PORT
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, broadcast, serve

rooms: defaultdict[str, set[ServerConnection]] = defaultdict(set)


async def handler(ws: ServerConnection) -> None:
    joined: list[str] = []
    try:
        async for message in ws:
            if not isinstance(message, str):
                continue
            verb, _, rest = message.partition(" ")
            if verb == "sub":
                rooms[rest].add(ws)
                joined.append(rest)
            elif verb == "pub":
                room, _, payload = rest.partition(" ")
                broadcast(rooms[room], payload)
    finally:
        for room in joined:
            rooms[room].discard(ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, max_queue=1024):
        await asyncio.Future()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
