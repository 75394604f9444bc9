"""Two real nodes sharing one real Redis and one MongoDB behave as one server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Node, RedisServer, base_env, token, unique_db
from wire import Raw, plain, sentinel, until

from realtime_safety.client import Client


def cluster_env(redis: RedisServer, mongo_uri: str) -> dict[str, str]:
    return {
        "RT_REDIS_URL": redis.url,
        "RT_MONGODB_URI": mongo_uri,
        "RT_MONGODB_DB": unique_db(),
        "RT_STORE_TIMEOUT_S": "10",
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, mongo_uri: str) -> Iterator[tuple[Node, Node]]:
    """One two-node cluster (a Redis of its own) for the tests that leave it as they found
    it, each on channels of its own; the SIGKILL and Redis-restart tests get one each."""
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    nodes: list[Node] = []
    try:
        redis.start()
        env = cluster_env(redis, mongo_uri)
        for n in ("a", "b"):
            data = tmp_path_factory.mktemp(f"node-{n}")
            nodes.append(Node(base_env(data, RT_NODE_ID=f"node-{n}", **env), n).start())
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.stop()
        redis.stop()


@pytest.fixture
def cluster(node_factory: Any, redis_server: RedisServer, mongo_uri: str) -> tuple[Node, Node]:
    """A two-node cluster for one test (one that kills a node or restarts Redis)."""
    env = cluster_env(redis_server, mongo_uri)
    return node_factory("a", RT_NODE_ID="node-a", **env), node_factory(
        "b", RT_NODE_ID="node-b", **env
    )


def chan(ns: str = "public") -> str:
    return f"{ns}:{uuid.uuid4().hex[:8]}"


async def test_a_message_published_on_one_node_reaches_the_other(
    shared: tuple[Node, Node],
) -> None:
    a, b = shared
    ch = chan()
    sub_b = await Raw.open(b.url, token("bob"), proto="rt.v1.msgpack")
    sub_a = await Raw.open(a.url, token("carol"))
    pub = await Raw.open(a.url, token("alice"))
    assert (await sub_b.ok("subscribe", channel=ch))["last_seq"] == 0
    await sub_a.ok("subscribe", channel=ch)
    for i in range(3):
        assert (
            await pub.ok("publish", channel=ch, client_msg_id=f"x{i}", body=plain(f"hello {i}"))
        )["seq"] == i + 1
    for sub in (sub_b, sub_a):
        pushes = [await sub.push() for _ in range(3)]
        assert [p["seq"] for p in pushes] == [1, 2, 3]
        assert pushes[0]["body"]["text"] == "hello 0"
    await pub.ok("typing", channel=ch)
    assert await sub_b.push() == {"push": "typing", "channel": ch, "user": "alice"}
    # history and idempotency are shared
    again = await Raw.open(b.url, token("alice"))
    dup = await again.ok("publish", channel=ch, client_msg_id="x1", body=plain("retry"))
    assert dup["seq"] == 2 and dup["duplicate"]
    assert [m["seq"] for m in (await again.ok("history", channel=ch))["messages"]] == [1, 2, 3]
    # the retry is fanned out again but delivered once: the next push is the next message
    await sub_b.nothing_before({**await sentinel(again, ch), "seq": 4})
    for r in (sub_a, sub_b, pub, again):
        await r.close()


async def test_membership_changes_take_effect_on_every_node(shared: tuple[Node, Node]) -> None:
    a, b = shared
    room = chan("room")
    bob = await Raw.open(b.url, token("bob"))
    assert await bob.error("subscribe", channel=room) == "forbidden"  # node b caches "no"
    a.add_member(room, "bob")  # through node a

    async def subscribed() -> bool:
        reply = await bob.cmd("subscribe", channel=room)
        assert reply["ok"] or reply["error"]["code"] == "forbidden", reply
        return bool(reply["ok"])

    await until(subscribed, 10, what="node b to drop its cached 'not a member'")
    assert a.api("DELETE", f"/v1/channels/{room}/members/bob").status_code == 204
    assert (await bob.push())["push"] == "unsubscribed"
    assert await bob.error("history", channel=room) == "forbidden"
    await bob.close()


async def test_concurrent_publishers_on_both_nodes_get_one_gap_free_order(
    shared: tuple[Node, Node],
) -> None:
    a, b = shared
    ch = chan()
    subs = [await Raw.open(n.url, token(f"s{i}")) for i, n in enumerate((a, b))]
    for s in subs:
        await s.ok("subscribe", channel=ch)
    pubs = [await Raw.open((a, b)[i % 2].url, token(f"p{i}")) for i in range(4)]

    async def run(i: int) -> list[int]:
        return [
            (
                await pubs[i].ok(
                    "publish", channel=ch, client_msg_id=f"{i}-{k}", body=plain(f"{i}-{k}")
                )
            )["seq"]
            for k in range(8)
        ]

    acked = await asyncio.gather(*(run(i) for i in range(4)))
    assert sorted(s for r in acked for s in r) == list(range(1, 33))
    orders = []
    for s in subs:
        pushes = [await s.push(10) for _ in range(32)]
        assert [p["seq"] for p in pushes] == list(range(1, 33))
        orders.append([p["client_msg_id"] for p in pushes])
    assert orders[0] == orders[1]  # both nodes deliver the same total order
    marker = await sentinel(pubs[0], ch)
    for s in subs:
        await s.nothing_before({**marker, "seq": 33})  # and nothing more than once
    for r in subs + pubs:
        await r.close()


async def test_sigkill_of_a_node_loses_nothing_and_clients_resume_elsewhere(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    ch = chan()
    # The subscriber prefers node a; the publisher also starts on node a.
    async with (
        Client([a.url, b.url], token("bob", ttl=600)) as sub,
        Client([a.url, b.url], token("alice", ttl=600)) as pub,
    ):
        await sub.subscribe(ch)
        assert sub.node == "node-a"
        acked: list[int] = []

        async def publish_all() -> None:
            for i in range(40):
                reply = await pub.publish(ch, plain(f"m{i}"), client_msg_id=f"m{i}")
                acked.append(reply["seq"])
                if i == 15:
                    a.kill()  # SIGKILL mid-burst
                await asyncio.sleep(0.01)  # pacing: a steady stream, not synchronisation

        await asyncio.wait_for(publish_all(), 60)
        assert sorted(acked) == list(range(1, 41))  # every publish acknowledged exactly once
        got = []
        while len(got) < 40:
            push = await sub.next_push(timeout=20)
            if push.get("push") == "message":
                got.append(push["seq"])
        assert got == list(range(1, 41))  # no gap, no duplicate, in order
        assert sub.duplicates == 0 and sub.gaps == 0
        assert sub.node == "node-b" and sub.reconnects >= 1
        assert pub.node == "node-b"
        history = await sub.history(ch, limit=200)
        assert [m["seq"] for m in history["messages"]] == list(range(1, 41))


async def test_redis_restart_fan_out_recovers_without_restarting_nodes(
    cluster: tuple[Node, Node],
    redis_server: RedisServer,
) -> None:
    a, b = cluster
    ch = chan()
    sub = await Raw.open(b.url, token("bob"))
    pub = await Raw.open(a.url, token("alice"))
    await sub.ok("subscribe", channel=ch)
    await pub.ok("publish", channel=ch, client_msg_id="before", body=plain("1"))
    assert (await sub.push())["seq"] == 1
    redis_server.stop()
    # Stored (so acknowledged) while Redis is down; fan-out to node b must follow later.
    reply = await pub.cmd("publish", channel=ch, client_msg_id="during", body=plain("2"))
    assert reply["ok"] and reply["seq"] == 2
    ready = await asyncio.to_thread(httpx.get, a.http + "/readyz")
    assert ready.status_code == 503 and ready.json()["broker"] is False
    redis_server.start()  # same port
    pushes = [await sub.push(20)]
    await pub.ok("publish", channel=ch, client_msg_id="after", body=plain("3"))
    pushes.append(await sub.push(20))
    assert [p["seq"] for p in pushes] == [2, 3]
    await sub.nothing_before({**await sentinel(pub, ch), "seq": 4})  # 2 came once

    async def ready() -> bool:
        return (await asyncio.to_thread(httpx.get, a.http + "/readyz")).status_code == 200

    await until(ready, 10, what="node a ready again")
    await sub.close()
    await pub.close()
