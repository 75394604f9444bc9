"""The hub's fan-out when the broker refuses a publish, on a real redis-server: a message
stored while the publishing node could not reach Redis still reaches the other nodes'
subscribers once it can, with nothing after it to trigger a gap repair."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import RedisServer

from realtime_safety.channels.broker import BrokerUnavailable, RedisBroker
from realtime_safety.channels.hub import Hub
from realtime_safety.channels.service import ChannelService
from realtime_safety.protocol import Frame
from realtime_safety.storage.sqlite import SqliteStore


class CutOff(RedisBroker):
    """This node's way to Redis, which the test can cut (the others' stays up)."""

    down = False

    async def publish(self, topic: str, data: bytes) -> None:
        if self.down:
            raise BrokerUnavailable("cut off")
        await super().publish(topic, data)


class Inbox:
    user = "reader"

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self._arrived = asyncio.Event()

    def deliver(self, channel: str, seq: int, frame: Frame) -> None:
        self.seqs.append(seq)
        self._arrived.set()

    async def holds(self, seqs: list[int], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while self.seqs != seqs:
                self._arrived.clear()
                await self._arrived.wait()

    def deliver_event(self, channel: str, frame: Frame) -> None:
        return None


async def test_a_message_whose_fan_out_failed_is_published_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    sender_broker = CutOff(redis_server.url, timeout_s=1)
    sender = Hub(sender_broker, store.messages, lambda event: None)
    reader = Hub(RedisBroker(redis_server.url, timeout_s=1), store.messages, lambda e: None)
    await sender.start()
    await reader.start()
    try:
        inbox = Inbox()
        await reader.add("public:quiet", inbox)
        service = ChannelService(store, sender, timeout_s=1, recovery_limit=100)
        body = {"v": 1, "alg": "none", "text": "hi"}
        await service.publish("public:quiet", "ann", None, "m1", body)
        await inbox.holds([1])
        sender_broker.down = True
        # Stored and acknowledged, but not fanned out; then the channel stays quiet.
        assert (await service.publish("public:quiet", "ann", None, "m2", body)).message.seq == 2
        assert (await service.publish("public:quiet", "ann", None, "m3", body)).message.seq == 3
        sender_broker.down = False
        await inbox.holds([1, 2, 3])  # 3 published again, 2 repaired from the store
    finally:
        await sender.close()
        await reader.close()
        await store.close()
