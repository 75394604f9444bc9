"""Gaps found by mutation testing (scripts/mutate channels): the hub's catch-up after a broker
reconnect, the delivery-lag metric, how the broker reports a pub/sub outage, a failed hub task's
log, the channel ops' replies and counters, and a membership's `since`, on a real
redis-server, a real SQLite store and a real server process."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import Node, RedisServer, token
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from wire import Raw, plain, until

from realtime_safety.channels.broker import InProcessBroker, RedisBroker
from realtime_safety.channels.hub import REPAIR_PAGE, Hub
from realtime_safety.channels.metrics import ChannelMetrics
from realtime_safety.channels.service import ChannelService
from realtime_safety.protocol import Frame
from realtime_safety.storage import StoreUnavailable
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


async def test_the_delivery_lag_is_the_age_of_the_message_when_it_is_fanned_out(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`rt_delivery_lag_seconds` observes, per message fanned out on this node, the time since
    the message was stored (its `ts`), not anything else (mutant: channels/hub.py,
    `time.time() - m.ts / 1000` with `+`)."""
    store = SqliteStore(tmp_path)
    await store.open()
    registry = CollectorRegistry()
    hub = Hub(
        RedisBroker(redis_server.url, timeout_s=2),
        store.messages,
        lambda event: None,
        metrics=ChannelMetrics(registry),
    )
    await hub.start()
    try:
        inbox = Inbox()
        await hub.add("public:lag", inbox)
        body = {"v": 1, "alg": "none", "text": "hi"}
        stored_at = int(time.time() * 1000) - 3000  # stored 3 s ago, fanned out now
        appended = await store.messages.append("public:lag", "ann", None, "m1", body, stored_at)
        before = time.time()
        await hub.publish(appended.message)
        await inbox.holds([1])
        age = time.time() - stored_at / 1000
        assert registry.get_sample_value("rt_delivery_lag_seconds_count") == 1
        lag = registry.get_sample_value("rt_delivery_lag_seconds_sum")
        assert lag is not None and before - stored_at / 1000 <= lag <= age, (lag, age)
        assert registry.get_sample_value("rt_delivery_lag_seconds_bucket", {"le": "2.5"}) == 0
        assert registry.get_sample_value("rt_delivery_lag_seconds_bucket", {"le": "5.0"}) == 1
    finally:
        await hub.close()
        await store.close()


async def test_a_pub_sub_outage_is_logged_once_and_ends_in_one_resync(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """However many times the broker's reconnect fails during one outage, the outage is one
    warning, and its end one info and one `on_resync`; the next outage is reported again
    (mutant: channels/broker.py, `if not self._recovering` without `not`, which stays silent at
    the first failure and warns at every later one). The failures are real Redis refusals,
    counted: Redis drops the subscriber when its channel permission is revoked (failure 1),
    refuses the reconnect's SUBSCRIBE while it stays revoked (failure 2), and the refused
    connection is then killed (failure 3) after the permission is restored."""
    caplog.set_level(logging.INFO, logger="realtime.broker")
    received: list[bytes] = []
    resyncs: list[float] = []
    broker = RedisBroker(redis_server.url, timeout_s=2)
    await broker.start(lambda topic, data: received.append(data), lambda: resyncs.append(1))
    admin = aioredis.from_url(redis_server.url, decode_responses=True)

    def said(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    async def refused_subscriber() -> str | None:
        clients = await admin.client_list()
        return next((c["id"] for c in clients if c["cmd"] == "subscribe" and c["sub"] == "0"), None)

    try:
        await broker.subscribe("rt:outage")
        await admin.execute_command("ACL", "SETUSER", "default", "resetchannels")
        refused = await until(refused_subscriber, what="the reconnect's SUBSCRIBE refused")
        await admin.execute_command("ACL", "SETUSER", "default", "allchannels")
        assert await admin.client_kill_filter(_id=refused) == 1
        await until(lambda: resyncs, what="the resync after the outage")
        assert said("connection lost") == 1
        assert said("re-subscribed") == 1 and len(resyncs) == 1
        await admin.publish("rt:outage", b"after")
        await until(lambda: received == [b"after"], what="a message after the outage")

        # The next outage (the subscriber's connection killed once) is reported too.
        assert await admin.client_kill_filter(_type="pubsub") == 1
        await until(lambda: len(resyncs) == 2, what="the resync after the second outage")
        assert said("connection lost") == 2 and said("re-subscribed") == 2
    finally:
        await admin.aclose()
        await broker.close()


def fields(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply without the envelope every reply has (`id`, `ok`)."""
    assert reply.pop("ok") is True, reply
    reply.pop("id")
    return reply


async def test_each_channel_op_replies_with_exactly_its_documented_fields(
    single_node: Node,
) -> None:
    """docs/protocol.md, "Channels": the replies of subscribe, publish (and its retry),
    history, read, typing, unsubscribe and members, field by field (mutant: channels/ops.py,
    the `read` reply's "channel" key misspelt)."""
    ch = f"public:{uuid.uuid4().hex[:10]}"
    room = f"room:{uuid.uuid4().hex[:10]}"
    ann = await Raw.open(single_node.url, token("ann"))
    try:
        assert fields(await ann.cmd("subscribe", channel=ch)) == {
            "channel": ch,
            "last_seq": 0,
            "recovered": True,
        }
        sent = fields(await ann.cmd("publish", channel=ch, client_msg_id="m1", body=plain("hi")))
        assert set(sent) == {"seq", "ts"} and sent["seq"] == 1
        again = fields(await ann.cmd("publish", channel=ch, client_msg_id="m1", body=plain("hi")))
        assert again == {**sent, "duplicate": True}
        assert (await ann.push())["seq"] == 1
        history = fields(await ann.cmd("history", channel=ch))
        assert [m["seq"] for m in history.pop("messages")] == [1]
        assert history == {"channel": ch, "has_more": False, "read_seq": 0}
        assert fields(await ann.cmd("read", channel=ch, seq=1)) == {"channel": ch, "read_seq": 1}
        assert fields(await ann.cmd("history", channel=ch))["read_seq"] == 1
        assert fields(await ann.cmd("typing", channel=ch)) == {}
        assert fields(await ann.cmd("unsubscribe", channel=ch)) == {}

        single_node.add_member(room, "ann")
        single_node.add_member(room, "bob")
        assert fields(await ann.cmd("members", channel=room, limit=1)) == {
            "channel": room,
            "members": ["ann"],
            "next": "ann",
        }
        assert fields(await ann.cmd("members", channel=room, after="ann")) == {
            "channel": room,
            "members": ["bob"],
            "next": None,
        }
    finally:
        await ann.close()


async def test_a_membership_records_when_it_began_in_milliseconds(tmp_path: Path) -> None:
    """A member added through the channel service is stored with `since`, the time it was
    added in milliseconds since the epoch, as `realtime export` writes it (mutant:
    channels/service.py, `int(time.time() * 1000)` with another factor)."""
    store = SqliteStore(tmp_path)
    await store.open()
    hub = Hub(InProcessBroker(), store.messages, lambda event: None)
    await hub.start()
    try:
        service = ChannelService(store, hub, timeout_s=5, recovery_limit=100)
        before = int(time.time() * 1000)
        assert await service.add_member("room:since", "ann")
        after = int(time.time() * 1000)
        assert not await service.add_member("room:since", "ann")  # already a member
        dumped = [r async for r in store.dump("memberships")]
        assert len(dumped) == 1 and dumped[0]["user"] == "ann"
        assert before <= dumped[0]["since"] <= after
    finally:
        await hub.close()
        await store.close()


async def test_a_failed_hub_task_is_logged_and_a_finished_one_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub's background tasks (a channel's initialisation, its gap repair…) fail
    loudly: an error log naming the task, with its exception; a task that simply finishes logs
    nothing (mutant: channels/hub.py, `task.exception() is not None` with `is`)."""
    caplog.set_level(logging.ERROR, logger="realtime.hub")
    store = SqliteStore(tmp_path)
    await store.open()
    hub = Hub(InProcessBroker(), store.messages, lambda event: None)
    await hub.start()
    try:
        await hub.add("public:fine", Inbox())  # its initialisation task finishes
        await store.close()  # the next initialisation cannot read the channel's last seq
        with pytest.raises(StoreUnavailable):
            await hub.add("public:broken", Inbox())
        await until(lambda: caplog.records, what="the failed task's log")
        [record] = caplog.records
        assert record.getMessage() == "hub task hub-init:public:broken failed"
        assert record.exc_info is not None and isinstance(record.exc_info[1], StoreUnavailable)
    finally:
        await hub.close()


def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(node.http + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_the_node_counts_each_publish_once_and_each_backend_call_by_its_op(
    single_node: Node,
) -> None:
    """/metrics: `rt_messages_published_total` counts stored messages (a retried publish is not
    one), `rt_backend_call_seconds{call}` each store call a channel op or the server API makes,
    under its name (mutants: channels/ops.py, `published += 1` with 2; channels/service.py,
    the "list members" and "remove member" calls' labels)."""
    ch = f"public:{uuid.uuid4().hex[:10]}"
    room = f"room:{uuid.uuid4().hex[:10]}"
    ann = await Raw.open(single_node.url, token("ann"))
    try:
        before = await asyncio.to_thread(scrape, single_node)
        await ann.ok("publish", channel=ch, client_msg_id="c1", body=plain("one"))
        await ann.ok("publish", channel=ch, client_msg_id="c2", body=plain("two"))
        assert (await ann.ok("publish", channel=ch, client_msg_id="c1", body=plain("one")))[
            "duplicate"
        ]
        await ann.ok("history", channel=ch)  # the page and the read marker: two calls
        await ann.ok("read", channel=ch, seq=2)
        single_node.add_member(room, "ann")
        await ann.ok("members", channel=room)
        assert single_node.api("DELETE", f"/v1/channels/{room}/members/ann").status_code == 204
        after = await asyncio.to_thread(scrape, single_node)
    finally:
        await ann.close()

    def added(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert added("rt_messages_published_total") == 2
    calls = "rt_backend_call_seconds_count"
    assert added(calls, call="publish") == 3
    assert added(calls, call="history") == 2
    assert added(calls, call="read") == 1
    assert added(calls, call="add member") == 1
    assert added(calls, call="list members") == 1
    assert added(calls, call="remove member") == 1


def node_channels(node: Node) -> float:
    return scrape(node)[("rt_node_channels", ())]


async def test_a_member_removed_from_a_room_no_longer_holds_the_channel_on_the_node(
    node_factory: Any,
) -> None:
    """A removed member's subscription ends on the node entirely: the unsubscribed push, and
    the node stops receiving the room from the broker when that was its last subscriber
    (`rt_node_channels`), also after the member's connection closes (mutant: channels/ops.py,
    `self._hub.remove(channel, subs)` removed from `kick`, which leaves the hub holding the
    channel for a subscription that no longer exists)."""
    node: Node = node_factory("kick")
    room = f"room:{uuid.uuid4().hex[:10]}"
    node.add_member(room, "bob")
    bob = await Raw.open(node.url, token("bob"))
    try:
        held = await asyncio.to_thread(node_channels, node)
        await bob.ok("subscribe", channel=room)
        assert await asyncio.to_thread(node_channels, node) == held + 1
        assert node.api("DELETE", f"/v1/channels/{room}/members/bob").status_code == 204
        assert await bob.push() == {"push": "unsubscribed", "channel": room, "reason": "removed"}

        async def released() -> bool:
            return await asyncio.to_thread(node_channels, node) == held

        await until(released, what="the node to release the room")
    finally:
        await bob.close()
