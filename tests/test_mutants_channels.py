"""Gaps found by mutation testing (scripts/mutate channels): the hub's catch-up after a broker
reconnect, on a real redis-server and a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from conftest import RedisServer

from realtime_safety.channels.broker import RedisBroker
from realtime_safety.channels.hub import REPAIR_PAGE, Hub
from realtime_safety.protocol import Frame
from realtime_safety.storage.sqlite import SqliteStore


class Inbox:
    user = "reader"

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self._arrived = asyncio.Event()

    def deliver(self, channel: str, seq: int, frame: Frame) -> None:
        self.seqs.append(seq)
        self._arrived.set()

    def deliver_event(self, channel: str, frame: Frame) -> None:
        return None

    async def holds(self, seqs: list[int], timeout: float = 20) -> None:
        try:
            async with asyncio.timeout(timeout):
                while self.seqs != seqs:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(
                f"got {len(self.seqs)} messages, last {self.seqs[-1:]}; want {len(seqs)}"
            ) from None


async def test_after_a_broker_reconnect_everything_stored_meanwhile_arrives(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """What the broker calls once it is back (`Hub.resync`, the `on_resync` of
    RedisBroker.start): every message stored while this node heard nothing is delivered, in
    order, even more than one repair page of them; and the node is told to resync, so it drops
    its membership cache (mutants: channels/hub.py `len(page) < REPAIR_PAGE` with `<=`, and
    the `self._on_control({"t": "resync"})` line removed)."""
    store = SqliteStore(tmp_path)
    await store.open()
    control: list[dict[str, Any]] = []
    hub = Hub(RedisBroker(redis_server.url, timeout_s=2), store.messages, control.append)
    await hub.start()
    try:
        inbox = Inbox()
        await hub.add("public:away", inbox)
        assert inbox.seqs == [] and control == []
        # Stored by other nodes while this one's pub/sub was down: nothing was heard of them.
        missed = REPAIR_PAGE * 2 + 3
        body = {"v": 1, "alg": "none", "text": "hi"}
        ts = int(time.time() * 1000)
        for i in range(missed):
            await store.messages.append("public:away", "ann", None, f"m{i}", body, ts)
        await asyncio.sleep(0)
        assert inbox.seqs == []

        hub.resync()
        assert {"t": "resync"} in control
        await inbox.holds(list(range(1, missed + 1)))
    finally:
        await hub.close()
        await store.close()
