"""Gaps found by mutation testing (scripts/mutate presence): real server processes on a real
redis-server and MongoDB."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import pytest
from conftest import Node, RedisServer, token, unique_db
from wire import Raw, until

from realtime_safety.presence.store import MemoryPresence, RedisPresence
from realtime_safety.presence.tracker import PresenceTracker


def chan() -> str:
    return f"public:{uuid.uuid4().hex[:8]}"


async def members(raw: Raw, channel: str) -> list[str]:
    reply = await raw.ok("presence", channel=channel)
    return sorted(m["user"] for m in reply["members"])


async def test_presence_since_is_milliseconds_since_the_epoch(single_node: Node) -> None:
    """A member's `since` is when it joined, in ms since the epoch (mutant:
    presence/tracker.py, `int(time.time() * 1000)` with `/`)."""
    ch = chan()
    before = int(time.time() * 1000)
    ann = await Raw.open(single_node.url, token("ann"))
    await ann.ok("subscribe", channel=ch)
    reply = await ann.ok("presence", channel=ch)
    after = int(time.time() * 1000)
    [member] = reply["members"]
    assert member["user"] == "ann"
    assert before - 1000 <= member["since"] <= after + 1000  # the two clocks are one
    await ann.close()


@pytest.fixture
def presence_env(redis_server: RedisServer, mongo_uri: str) -> dict[str, str]:
    return {
        "RT_REDIS_URL": redis_server.url,
        "RT_MONGODB_URI": mongo_uri,
        "RT_MONGODB_DB": unique_db(),
        "RT_PRESENCE_HEARTBEAT_S": "0.5",
        "RT_PRESENCE_NODE_TIMEOUT_S": "2",
    }


async def test_a_node_declared_dead_while_paused_puts_its_members_back(
    node_factory: Any, presence_env: dict[str, str]
) -> None:
    """A node that stops heartbeating (here: stopped with SIGSTOP) is declared dead and its
    members leave; when it runs again it notices that its heartbeat key had expired and puts
    back the members its sockets still hold (mutant: presence/store.py, the heartbeat's
    `SET … GET` without GET, which makes every heartbeat look continuous)."""
    a: Node = node_factory("a", RT_NODE_ID="a", **presence_env)
    b: Node = node_factory("b", RT_NODE_ID="b", **presence_env)
    ch = chan()
    watcher = await Raw.open(a.url, token("watcher"))
    await watcher.ok("subscribe", channel=ch)
    bea = await Raw.open(b.url, token("bea"), ping_interval=None)
    await bea.ok("subscribe", channel=ch)

    async def listed(users: list[str]) -> bool:
        return await members(watcher, ch) == users

    await until(lambda: listed(["bea", "watcher"]), 10, what="bea to join")
    b.kill(signal.SIGSTOP)
    try:
        await until(lambda: listed(["watcher"]), 20, what="b to be declared dead")
    finally:
        b.kill(signal.SIGCONT)
    await until(lambda: listed(["bea", "watcher"]), 20, what="b to put bea back")
    assert await bea.ok("ping")  # her connection was never closed
    for r in (watcher, bea):
        await r.close()


async def test_members_restored_after_a_redis_restart_leave_when_their_node_dies(
    node_factory: Any, presence_env: dict[str, str], redis_server: RedisServer
) -> None:
    """After Redis lost its data, each node puts its members back; they must also be back in
    the node's index, or a later death of that node leaves them "online" for good (mutant:
    presence/store.py, `restore` joining without indexing)."""
    a: Node = node_factory("a", RT_NODE_ID="a", **presence_env)
    b: Node = node_factory("b", RT_NODE_ID="b", **presence_env)
    ch = chan()
    watcher = await Raw.open(b.url, token("wanda"))
    await watcher.ok("subscribe", channel=ch)
    doomed = await Raw.open(a.url, token("dora"))
    await doomed.ok("subscribe", channel=ch)
    redis_server.stop()
    redis_server.start()  # empty: both nodes restore their entries

    async def listed(users: list[str]) -> bool:
        reply = await watcher.cmd("presence", channel=ch)
        return bool(reply["ok"]) and sorted(m["user"] for m in reply["members"]) == users

    await until(lambda: listed(["dora", "wanda"]), 15, what="presence to be restored")
    a.kill()  # SIGKILL: node b must reap dora, from the restored index
    await until(lambda: listed(["wanda"]), 20, what="dora to leave after her node died")
    await watcher.close()


async def test_presence_calls_queued_behind_a_failed_one_are_answered_and_reconciled(
    node_factory: Any, presence_env: dict[str, str], redis_server: RedisServer
) -> None:
    """Joins and leaves are written in batches; when one batch fails (Redis does not answer),
    every command waiting on it must still be answered (the entry is reconciled later), and
    so must the batch of the other kind queued behind it. Once Redis answers again the node
    makes the store hold what its sockets hold. (Mutants: presence/tracker.py, the failed
    batch's `if not fut.done(): fut.set_exception(exc)` without `not` or without the call,
    which leaves the waiting commands unanswered for good; and its `continue` as `break`,
    which strands the batch queued behind.)"""
    node: Node = node_factory("p", RT_NODE_ID="p", RT_STORE_TIMEOUT_S="1", **presence_env)
    ch = chan()
    ann = await Raw.open(node.url, token("ann"))
    bob = await Raw.open(node.url, token("bob"))
    carl = await Raw.open(node.url, token("carl"))
    await ann.ok("subscribe", channel=ch)
    await bob.ok("subscribe", channel=ch)  # the node now receives ch: no Redis call to add
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # each store call now waits out its timeout
    try:
        # ann's leave and carl's join are made while the first of them is failing (for at
        # least the 1 s store timeout), so the other one is queued behind it
        left, joined = await asyncio.gather(
            ann.cmd("unsubscribe", channel=ch, timeout=30),
            carl.cmd("subscribe", channel=ch, timeout=30),
        )
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert left["ok"], left
    assert joined["ok"], joined
    # each failure is a warning of the presence logger (mutant: presence/tracker.py, the
    # logger's name)
    warned = [line for line in node.log().splitlines() if " WARNING realtime.presence" in line]
    assert any("presence leave" in line and "failed" in line for line in warned), warned
    assert any("presence join" in line and "failed" in line for line in warned), warned

    async def listed() -> bool:
        reply = await bob.cmd("presence", channel=ch)
        return bool(reply["ok"]) and sorted(m["user"] for m in reply["members"]) == [
            "bob",
            "carl",
        ]

    await until(listed, 15, what="the node to reconcile: ann gone, carl there")
    # and the reconciliation told bob what the failed calls could not (mutants: presence/
    # tracker.py, the reconcile's leave push removed or its condition negated)
    pushes = [await bob.push(10, presence=True) for _ in range(2)]
    assert [(p["push"], p["user"]) for p in pushes] == [("leave", "ann"), ("join", "carl")]
    for r in (ann, bob, carl):
        await r.close()


async def test_a_node_stopped_before_reconciling_a_failed_leave_leaves_no_one_behind(
    node_factory: Any, presence_env: dict[str, str], redis_server: RedisServer
) -> None:
    """A clean stop withdraws everything the store holds for the node, not only what its
    sockets hold: a leave that failed (Redis did not answer) and was not reconciled yet
    (the next heartbeat is far off) must not leave its user online for good once the node
    has stopped and forgotten itself (nobody would reap it)."""
    slow = {**presence_env, "RT_PRESENCE_HEARTBEAT_S": "30", "RT_PRESENCE_NODE_TIMEOUT_S": "90"}
    a: Node = node_factory("a", RT_NODE_ID="a", **slow)
    b: Node = node_factory("b", RT_NODE_ID="b", RT_STORE_TIMEOUT_S="1", **slow)
    ch = chan()
    watcher = await Raw.open(a.url, token("watcher"))
    await watcher.ok("subscribe", channel=ch)
    gus = await Raw.open(b.url, token("gus"))
    await gus.ok("subscribe", channel=ch)
    assert await watcher.push(10, presence=True) == {
        "push": "join", "channel": ch, "user": "gus"
    }  # fmt: skip
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        reply = await gus.cmd("unsubscribe", channel=ch, timeout=30)  # its leave fails
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert reply["ok"], reply
    assert await members(watcher, ch) == ["gus", "watcher"]  # not reconciled yet
    b.kill(signal.SIGTERM)
    assert b.wait() == 0
    assert await members(watcher, ch) == ["watcher"]
    push = await watcher.push(10, presence=True)
    assert (push["push"], push["user"]) == ("leave", "gus")
    await watcher.close()


async def test_invisible_on_one_node_hides_the_user_on_every_node(
    node_factory: Any, presence_env: dict[str, str]
) -> None:
    """`presence.invisible` is kept in Redis, so a user invisible on one node looks offline
    to users of every node, and visible again everywhere after turning it off (mutant:
    presence/store.py, RedisPresence.set_invisible with its condition negated)."""
    a: Node = node_factory("a", RT_NODE_ID="a", **presence_env)
    b: Node = node_factory("b", RT_NODE_ID="b", **presence_env)
    name = f"ivy-{uuid.uuid4().hex[:6]}"
    ivy = await Raw.open(a.url, token(name))
    carol = await Raw.open(b.url, token("carol", ["user", "moderator"]))  # may see anyone
    await until(lambda: members(carol, f"user:{name}"), 10, what="ivy to be online")
    await ivy.ok("presence.invisible", invisible=True)
    assert await members(carol, f"user:{name}") == []
    assert await members(ivy, f"user:{name}") == [name]  # she still sees herself
    await ivy.ok("presence.invisible", invisible=False)
    assert await members(carol, f"user:{name}") == [name]
    for r in (ivy, carol):
        await r.close()


async def test_a_dead_node_claimed_by_another_survivor_is_left_to_it(
    node_factory: Any, presence_env: dict[str, str], redis_server: RedisServer
) -> None:
    """One survivor per dead node clears its entries: the one that wins the claim. While
    another survivor holds the claim on dead node b, node a leaves b's members alone, yet
    still reaps node c, which died after b (mutants: presence/tracker.py, `if not await
    claim_reap(...)` without `not`; presence/store.py, the claim's SET without NX)."""
    a: Node = node_factory("a", RT_NODE_ID="a", **presence_env)
    b: Node = node_factory("b", RT_NODE_ID="b", **presence_env)
    c: Node = node_factory("c", RT_NODE_ID="c", **presence_env)
    ch = chan()
    watcher = await Raw.open(a.url, token("watcher"))
    await watcher.ok("subscribe", channel=ch)
    for node, user in ((b, "bea"), (c, "cleo")):
        raw = await Raw.open(node.url, token(user))
        await raw.ok("subscribe", channel=ch)
    await until(
        lambda: _listed(watcher, ch, ["bea", "cleo", "watcher"]), 10, what="everyone to join"
    )
    other = RedisPresence(redis_server.url, node_timeout_s=0.6)
    try:
        assert await other.claim_reap("other", "b", 60)  # another survivor is on b
        b.kill()
        # c dies once b's last heartbeat is older than any c could still send, so that
        # whenever a sees c dead it sees b dead too
        await until(lambda: _has(other.dead_nodes("watcher"), "b"), 10, what="b to go quiet")
        c.kill()
        while True:  # the first leave a pushes is c's member's: b's is not a's to push
            push = await watcher.push(20, presence=True)
            if push["push"] == "leave":
                break
        assert push["user"] == "cleo", push
        assert await members(watcher, ch) == ["bea", "watcher"]
    finally:
        await other.close()
    await watcher.close()


async def _listed(raw: Raw, channel: str, users: list[str]) -> bool:
    return await members(raw, channel) == users


async def _has(found: Awaitable[list[str]], item: str) -> bool:
    return item in await found


async def test_a_node_reaped_while_alive_puts_its_members_back(
    node_factory: Any, presence_env: dict[str, str], redis_server: RedisServer
) -> None:
    """A survivor may reap a node that is in fact alive: it judges a node dead by the time
    the node wrote in its last heartbeat, while the node's own liveness key expires counted
    from when Redis got that heartbeat, so after a stall just over the timeout the node can
    be reaped and still find its key. Here the test is that survivor (through the store's
    own calls). The node must notice at its next heartbeat that it was forgotten and put
    back the members its sockets hold, telling the channel they joined."""
    node: Node = node_factory("b", RT_NODE_ID="b", **presence_env)
    ch = chan()
    bea = await Raw.open(node.url, token("bea"))
    await bea.ok("subscribe", channel=ch)
    watcher = await Raw.open(node.url, token("watcher"))
    await watcher.ok("subscribe", channel=ch)
    survivor = RedisPresence(redis_server.url)
    try:
        assert await survivor.claim_reap("survivor", "b", 60)
        entries = await survivor.entries_of("b")
        assert (ch, "bea") in entries
        await survivor.leave("b", entries)
        await survivor.forget_node("b")
    finally:
        await survivor.close()
    # watcher subscribed after bea, so a join of bea can only come from putting her back
    while True:
        push = await watcher.push(10, presence=True)
        if (push["push"], push["user"]) == ("join", "bea"):
            break
    assert await members(watcher, ch) == ["bea", "watcher"]
    for r in (bea, watcher):
        await r.close()


async def test_a_leave_and_a_join_of_one_moment_reach_the_store_each_as_itself() -> None:
    """Joins and leaves made in the same moment are written in batches of one kind, in the
    order they were made: bob leaving while ann joins leaves ann, and a quick subscribe then
    unsubscribe leaves nobody (mutant: presence/tracker.py, the run of one kind counted two
    at a time, which wrote the second call as the first one's kind). The embedded store
    answers at once, so the calls of one moment are the batch."""
    pushed: list[tuple[str, str, str]] = []

    async def publish(channel: str, kind: str, user: str) -> None:
        pushed.append((channel, kind, user))

    tracker = PresenceTracker(MemoryPresence(), "n", publish)
    await tracker.add("room", "bob")
    await asyncio.gather(tracker.remove("room", "bob"), tracker.add("room", "ann"))
    assert [user for user, _ in (await tracker.members("room", 0, 10)).members] == ["ann"]
    await asyncio.gather(tracker.add("room2", "cy"), tracker.remove("room2", "cy"))
    assert (await tracker.members("room2", 0, 10)).members == []
    assert pushed == [
        ("room", "join", "bob"),
        ("room", "leave", "bob"),
        ("room", "join", "ann"),
        ("room2", "join", "cy"),
        ("room2", "leave", "cy"),
    ]


async def test_a_tracker_that_never_had_a_member_stops_cleanly() -> None:
    """Stopping a node's presence before any socket subscribed (no batch ever written) is a
    clean stop (mutant: presence/tracker.py, the batch's cancel with `self._task is not
    None` negated, which cancels None)."""
    tracker = PresenceTracker(MemoryPresence(), "n", _no_push)
    await tracker.start()
    await tracker.stop()


async def _no_push(channel: str, kind: str, user: str) -> None:
    raise AssertionError(f"unexpected push {kind} {user} on {channel}")


async def test_a_burst_is_written_in_batches_of_at_most_1000() -> None:
    """Joins made in the same moment go to the store together, at most 1,000 per write (one
    Redis pipeline each: a bigger burst never becomes one unbounded pipeline): 1,000 joins
    are one write, 1,001 are two (mutant: presence/tracker.py, `run < 1000` as `<=`). The
    embedded store answers at once, so the calls of one moment are the batch."""
    tracker = PresenceTracker(MemoryPresence(), "n", _quiet)
    batch = tracker._batch  # the write counter the presence benchmark reports as round trips
    await asyncio.gather(*(tracker.add("a", f"u{i}") for i in range(1000)))
    assert batch.flushes == 1
    await asyncio.gather(*(tracker.add("b", f"u{i}") for i in range(1001)))
    assert batch.flushes == 3
    assert (await tracker.members("b", 0, 2000)).total == 1001


async def _quiet(channel: str, kind: str, user: str) -> None:
    return None
