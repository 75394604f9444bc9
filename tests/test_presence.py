"""Presence (docs/protocol-v1.md section 6) on one node and across nodes, crashes and Redis
restarts."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
from conftest import Node, RedisServer, token, unique_db
from wire import Raw, sentinel, until

from realtime_safety.presence.store import NODES


def chan() -> str:
    return f"public:{uuid.uuid4().hex[:8]}"


async def presence_pushes(raw: Raw, count: int, timeout: float) -> list[tuple[str, str]]:
    got = []
    for _ in range(count):
        push = await raw.push(timeout, presence=True)
        assert push["push"] in ("join", "leave"), push
        got.append((push["push"], push["user"]))
    return got


async def members(raw: Raw, channel: str) -> list[str]:
    reply = await raw.ok("presence", channel=channel)
    return [m["user"] for m in reply["members"]]


async def closed(raw: Raw, node: Node) -> None:
    """Close `raw` and wait until its node has finished with it: a connection leaves the
    node's connection gauge only after its presence was withdrawn and any leave published,
    so a sentinel published after this comes after that leave."""
    before = await asyncio.to_thread(node.connections)
    await raw.close()

    async def gone() -> bool:
        return await asyncio.to_thread(node.connections) <= before - 1

    await until(gone, 10, what=f"{node.name} to finish with the closed connection")


async def test_presence_on_one_node(single_node: Node) -> None:
    ch = chan()
    watcher = await Raw.open(single_node.url, token("watcher"))
    await watcher.ok("subscribe", channel=ch)
    alice1 = await Raw.open(single_node.url, token("alice"))
    await alice1.ok("subscribe", channel=ch)
    assert await presence_pushes(watcher, 1, 5) == [("join", "alice")]
    alice2 = await Raw.open(single_node.url, token("alice"))
    await alice2.ok("subscribe", channel=ch)  # a second device: no second join
    await watcher.nothing_before(await sentinel(alice2, ch), presence=True)
    reply = await watcher.ok("presence", channel=ch)
    assert sorted(m["user"] for m in reply["members"]) == ["alice", "watcher"]
    assert all(isinstance(m["since"], int) for m in reply["members"])
    assert reply["total"] == 2 and reply["cursor"] == 0
    await closed(alice1, single_node)  # one of two devices: no leave
    await watcher.nothing_before(await sentinel(alice2, ch), presence=True)
    await alice2.ok("unsubscribe", channel=ch)
    assert await presence_pushes(watcher, 1, 5) == [("leave", "alice")]
    assert await members(watcher, ch) == ["watcher"]
    assert await watcher.error("presence", channel="room:secret") == "forbidden"
    for r in (watcher, alice2):
        await r.close()


async def test_online_status_and_invisible(single_node: Node) -> None:
    # carol may see bob's online status: they share a room (tests/test_presence_privacy.py
    # has who else may, and who may not)
    await asyncio.to_thread(single_node.add_member, "room:bob-and-carol", "bob")
    await asyncio.to_thread(single_node.add_member, "room:bob-and-carol", "carol")
    await asyncio.to_thread(single_node.add_member, "room:bob-and-carol", "nobody-here")
    bob = await Raw.open(single_node.url, token("bob"))
    carol = await Raw.open(single_node.url, token("carol"))
    assert await members(carol, "user:bob") == ["bob"]
    assert await members(carol, "user:nobody-here") == []
    assert (await bob.ok("presence.invisible", invisible=True))["invisible"] is True
    assert await members(carol, "user:bob") == []
    assert await members(bob, "user:bob") == ["bob"]  # you always see yourself
    await bob.ok("presence.invisible", invisible=False)
    assert await members(carol, "user:bob") == ["bob"]
    assert await bob.error("presence.invisible", invisible="yes") == "bad_request"
    await bob.close()

    async def offline() -> bool:
        return await members(carol, "user:bob") == []

    await until(offline, 10, what="bob to go offline")
    await carol.close()


async def test_large_channel_presence_is_paged(single_node: Node) -> None:
    ch = chan()
    clients = [await Raw.open(single_node.url, token(f"m{i:03d}")) for i in range(30)]
    for c in clients:
        await c.ok("subscribe", channel=ch)
    seen: list[str] = []
    cursor = 0
    while True:
        page = await clients[0].ok("presence", channel=ch, cursor=cursor, limit=7)
        assert page["total"] == 30
        seen += [m["user"] for m in page["members"]]
        cursor = page["cursor"]
        if cursor == 0:
            break
    assert sorted(seen) == [f"m{i:03d}" for i in range(30)]
    await asyncio.gather(*(c.close() for c in clients))


@pytest.fixture
def presence_env(redis_server: RedisServer, mongo_uri: str) -> dict[str, str]:
    return {
        "RT_REDIS_URL": redis_server.url,
        "RT_MONGODB_URI": mongo_uri,
        "RT_MONGODB_DB": unique_db(),
        "RT_PRESENCE_HEARTBEAT_S": "0.5",
        "RT_PRESENCE_NODE_TIMEOUT_S": "2",
    }


async def test_join_and_leave_once_across_nodes(
    node_factory: Any, presence_env: dict[str, str]
) -> None:
    a: Node = node_factory("a", RT_NODE_ID="a", **presence_env)
    b: Node = node_factory("b", RT_NODE_ID="b", **presence_env)
    ch = chan()
    on_a = await Raw.open(a.url, token("anna"))
    on_b = await Raw.open(b.url, token("ben"))
    await on_a.ok("subscribe", channel=ch)
    await on_b.ok("subscribe", channel=ch)
    assert await presence_pushes(on_a, 1, 5) == [("join", "ben")]
    # ben's second device, on the other node: nobody is told anything
    ben2 = await Raw.open(a.url, token("ben"))
    await ben2.ok("subscribe", channel=ch)
    await on_a.nothing_before(await sentinel(ben2, ch), presence=True)
    assert sorted(await members(on_a, ch)) == ["anna", "ben"]
    assert sorted(await members(on_b, ch)) == ["anna", "ben"]
    await closed(on_b, b)  # one of ben's two connections
    await on_a.nothing_before(await sentinel(ben2, ch), presence=True)
    await closed(ben2, a)
    assert await presence_pushes(on_a, 1, 5) == [("leave", "ben")]
    # once: node b (ben's other node) pushed no leave of its own either
    await on_a.nothing_before(await sentinel(on_a, ch), presence=True)
    await on_a.close()


async def test_a_killed_node_s_members_leave_once(
    node_factory: Any, presence_env: dict[str, str]
) -> None:
    a: Node = node_factory("a", RT_NODE_ID="a", **presence_env)
    b: Node = node_factory("b", RT_NODE_ID="b", **presence_env)
    c: Node = node_factory("c", RT_NODE_ID="c", **presence_env)
    ch = chan()
    watch_a = await Raw.open(a.url, token("wa"))
    watch_b = await Raw.open(b.url, token("wb"))
    await watch_a.ok("subscribe", channel=ch)
    await watch_b.ok("subscribe", channel=ch)
    doomed = [await Raw.open(c.url, token(f"d{i}")) for i in range(3)]
    for d in doomed:
        await d.ok("subscribe", channel=ch)
    for w in (watch_a, watch_b):
        pushes = await presence_pushes(w, 4 if w is watch_a else 3, 5)
        assert {u for kind, u in pushes if kind == "join"} >= {"d0", "d1", "d2"}
    c.kill()  # SIGKILL: no leave from c itself
    loop = asyncio.get_running_loop()
    started = loop.time()
    for w in (watch_a, watch_b):
        leaves = await presence_pushes(w, 3, 30)
        assert sorted(leaves) == [("leave", "d0"), ("leave", "d1"), ("leave", "d2")]
    assert loop.time() - started < 30
    # Exactly once, not once per surviving node: once node c is forgotten (after its reaper
    # pushed its leaves) nobody can reap it again, and a sentinel after that comes next.
    store = redis.Redis.from_url(presence_env["RT_REDIS_URL"])
    await until(lambda: not store.hexists(NODES, "c"), 30, what="node c to be forgotten")
    store.close()
    marker = await sentinel(watch_a, ch)
    for w in (watch_a, watch_b):
        await w.nothing_before(marker, presence=True)
        assert sorted(await members(w, ch)) == ["wa", "wb"]
    back = await Raw.open(a.url, token("d0"))  # the user reconnects elsewhere
    await back.ok("subscribe", channel=ch)
    assert await presence_pushes(watch_b, 1, 5) == [("join", "d0")]
    for r in (watch_a, watch_b, back):
        await r.close()


async def test_presence_is_rebuilt_after_a_redis_restart(
    node_factory: Any, presence_env: dict[str, str], redis_server: RedisServer
) -> None:
    a: Node = node_factory("a", RT_NODE_ID="a", **presence_env)
    b: Node = node_factory("b", RT_NODE_ID="b", **presence_env)
    ch = chan()
    on_a = await Raw.open(a.url, token("anna"))
    on_b = await Raw.open(b.url, token("ben"))
    await on_a.ok("subscribe", channel=ch)
    await on_b.ok("subscribe", channel=ch)
    assert await presence_pushes(on_a, 1, 5) == [("join", "ben")]
    assert sorted(await members(on_a, ch)) == ["anna", "ben"]
    redis_server.stop()
    redis_server.start()  # empty: presence is gone from Redis

    async def rebuilt() -> bool:
        reply = await on_a.cmd("presence", channel=ch)
        if not reply["ok"]:
            assert reply["error"]["code"] == "unavailable", reply  # while Redis comes back
            return False
        return sorted(m["user"] for m in reply["members"]) == ["anna", "ben"]

    await until(rebuilt, 15, what="both nodes to restore their presence entries")
    assert sorted(await members(on_b, ch)) == ["anna", "ben"]
    # Nobody left, so nobody is told anyone joined, and presence works on: carl's join (a
    # sentinel, published after both nodes restored) is the next presence push on_a gets.
    carl = await Raw.open(b.url, token("carl"))
    await carl.ok("subscribe", channel=ch)
    assert await presence_pushes(on_a, 1, 10) == [("join", "carl")]
    for r in (on_a, on_b, carl):
        await r.close()


async def test_join_leave_pushes_stop_on_large_channels(node_factory: Any) -> None:
    node: Node = node_factory("capped", RT_PRESENCE_PUSH_LIMIT="2")
    ch = chan()
    first = await Raw.open(node.url, token("u1"))
    await first.ok("subscribe", channel=ch)
    second = await Raw.open(node.url, token("u2"))
    await second.ok("subscribe", channel=ch)
    assert await presence_pushes(first, 1, 5) == [("join", "u2")]  # 2 members: pushed
    third = await Raw.open(node.url, token("u3"))
    await third.ok("subscribe", channel=ch)
    # 3 members: over the limit, no push
    await first.nothing_before(await sentinel(third, ch), presence=True)
    assert sorted(await members(first, ch)) == ["u1", "u2", "u3"]  # presence still tells
    await closed(third, node)
    # leaving a 3-member channel: no push
    await first.nothing_before(await sentinel(second, ch), presence=True)
    await second.close()
    assert await presence_pushes(first, 1, 5) == [("leave", "u2")]
    await first.close()
