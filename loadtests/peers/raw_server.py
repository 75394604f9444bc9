"""The ceiling: a minimal `websockets` broadcast server with no protocol at all. A client
that sends "sub" receives every frame any client sends afterwards.

    python -m loadtests.peers.raw_server PORT
"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve

subscribers: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "sub":
            subscribers.add(ws)
        else:
            broadcast(subscribers, message)
    subscribers.discard(ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, max_queue=1024):
        await asyncio.Future()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
