"""The Python client under repeated node deaths: a publisher whose node is SIGKILLed again and
again (each time restarted) keeps every publish exactly once and in order, and a subscriber
resumes after every death with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from conftest import Node, RedisServer, shared_env, token
from wire import plain

from realtime_safety.client import Client

ROUNDS = 5
PER_ROUND = 12


async def test_a_publisher_survives_its_node_dying_again_and_again(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> None:
    env = shared_env(redis_server, mongo_uri)
    nodes: list[Node] = [node_factory(n, RT_NODE_ID=n, **env) for n in ("node-a", "node-b")]
    ch = f"public:{uuid.uuid4().hex[:8]}"
    urls = [n.url for n in nodes]
    async with (
        Client(urls, token("alice", ttl=600), max_backoff_s=0.3) as pub,
        Client(urls[::-1], token("bob", ttl=600), max_backoff_s=0.3) as sub,
    ):
        await sub.subscribe(ch)
        acked: list[int] = []
        for round_ in range(ROUNDS):
            victim = next(n for n in nodes if n.env["RT_NODE_ID"] == pub.node)
            for i in range(PER_ROUND):
                cmid = f"r{round_}m{i}"
                if i == PER_ROUND // 2:
                    victim.kill()  # SIGKILL with the publisher mid-burst
                reply = await asyncio.wait_for(pub.publish(ch, plain(cmid), client_msg_id=cmid), 30)
                acked.append(reply["seq"])
            assert pub.node != victim.env["RT_NODE_ID"]  # it moved to the survivor
            await asyncio.to_thread(victim.wait)
            victim.start()  # back on the same port, for the next round to kill the other
        total = ROUNDS * PER_ROUND
        assert sorted(acked) == list(range(1, total + 1))  # each publish once, none lost
        got: list[int] = []
        while len(got) < total:
            push = await sub.next_push(timeout=20)
            if push.get("push") == "message":
                got.append(push["seq"])
        assert got == list(range(1, total + 1))  # in order, no gap, no duplicate
        assert sub.duplicates == 0 and sub.gaps == 0
        assert pub.reconnects >= ROUNDS
