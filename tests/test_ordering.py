"""Each subscriber gets a channel's messages in seq order, each once (docs/protocol-v1.md,
section 4), driven step by step instead of raced:

- gap repair: a message written straight into the shared store and never fanned out (a node
  that died between store and publish) reaches subscribers, before the next one, once;
- the hub (channels/hub.py) fed messages before its initialisation ends, out of order and
  twice, on a real redis-server and a real SQLite store;
- the replay/live merge of `subscribe {since_seq}` (channels/ops.py, channels/subscriptions.py):
  live messages that arrive while the replay is read wait, and the message at the boundary
  (the replay's `last_seq`, which may also arrive live) is pushed once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Node, RedisServer, base_env, token, unique_db
from wire import Raw, plain

from realtime_safety.channels.broker import RedisBroker
from realtime_safety.channels.hub import CHANNEL_TOPIC, Hub, pack_message
from realtime_safety.channels.metrics import ChannelMetrics
from realtime_safety.channels.ops import ChannelLimits, ChannelOps
from realtime_safety.channels.service import ChannelService
from realtime_safety.protocol import JSON, Frame, Identity
from realtime_safety.realtime.config import Limits
from realtime_safety.storage import Message
from realtime_safety.storage.mongo import MongoStore
from realtime_safety.storage.sqlite import SqliteStore


def chan() -> str:
    return f"public:{uuid.uuid4().hex[:10]}"


def body(text: str) -> dict[str, Any]:
    return plain(text)


async def sentinel(pub: Raw, channel: str) -> str:
    cmid = f"sentinel-{uuid.uuid4().hex[:8]}"
    await pub.ok("publish", channel=channel, client_msg_id=cmid, body=plain("sentinel"))
    return cmid


async def seqs_then_sentinel(raw: Raw, cmid: str) -> list[int]:
    """The seqs of the message pushes that come before the sentinel `cmid`."""
    seqs = []
    while True:
        frame = await raw.push()
        assert frame["push"] == "message", frame
        if frame["client_msg_id"] == cmid:
            return seqs
        seqs.append(frame["seq"])


# --- gap repair through real nodes --------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(base_env(tmp_path_factory.mktemp("ordering")), "ordering")
    node.start()
    yield node
    node.stop()


@pytest.fixture
async def node_store(sqlite_node: Node) -> AsyncIterator[SqliteStore]:
    """The node's own SQLite store, opened a second time: writes here are stored and never
    fanned out."""
    store = SqliteStore(Path(sqlite_node.env["RT_DATA_DIR"]))
    await store.open()
    yield store
    await store.close()


async def test_gap_repair_delivers_a_message_that_was_never_fanned_out(
    sqlite_node: Node, node_store: SqliteStore
) -> None:
    ch = chan()
    sub = await Raw.open(sqlite_node.url, token("bob"))
    await sub.ok("subscribe", channel=ch)
    pub = await Raw.open(sqlite_node.url, token("alice"))
    assert (await pub.ok("publish", channel=ch, client_msg_id="m1", body=body("1")))["seq"] == 1
    stored = await node_store.messages.append(ch, "ghost", None, "m2", body("2"), 0)
    assert stored.message.seq == 2  # the store's next seq; nobody was told
    assert (await pub.ok("publish", channel=ch, client_msg_id="m3", body=body("3")))["seq"] == 3
    got = [await sub.push() for _ in range(3)]
    assert [(m["seq"], m["client_msg_id"]) for m in got] == [(1, "m1"), (2, "m2"), (3, "m3")]
    assert got[1]["from"]["user"] == "ghost"
    cmid = await sentinel(pub, ch)
    assert await seqs_then_sentinel(sub, cmid) == []  # nothing twice
    await sub.close()
    await pub.close()


async def test_replay_then_repair_of_the_same_messages_pushes_each_once(
    sqlite_node: Node, node_store: SqliteStore
) -> None:
    """The node already receives the channel (bob subscribed, the hub expects seq 2) when
    2 and 3 are stored without a fan-out. Carol subscribes from 1: her replay holds 2 and 3.
    The next publish (4) makes the hub repair 2 and 3 from the store and deliver 2, 3, 4 to
    both: bob needs them, carol must drop what her replay already gave her."""
    ch = chan()
    pub = await Raw.open(sqlite_node.url, token("alice"))
    bob = await Raw.open(sqlite_node.url, token("bob"))
    await bob.ok("subscribe", channel=ch)
    await pub.ok("publish", channel=ch, client_msg_id="m1", body=body("1"))
    assert (await bob.push())["seq"] == 1
    for seq in (2, 3):
        stored = await node_store.messages.append(ch, "ghost", None, f"m{seq}", body("x"), 0)
        assert stored.message.seq == seq
    carol = await Raw.open(sqlite_node.url, token("carol"))
    reply = await carol.ok("subscribe", channel=ch, since_seq=1)
    assert reply["last_seq"] == 3 and reply["recovered"] is True
    assert [(await carol.push())["seq"] for _ in range(2)] == [2, 3]  # the replay
    await pub.ok("publish", channel=ch, client_msg_id="m4", body=body("4"))
    cmid = await sentinel(pub, ch)
    assert await seqs_then_sentinel(carol, cmid) == [4]
    assert await seqs_then_sentinel(bob, cmid) == [2, 3, 4]
    for r in (pub, bob, carol):
        await r.close()


async def test_cluster_gap_repair_from_mongodb(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> None:
    """Two nodes on Redis and MongoDB. A message stored in MongoDB and never published (its
    node died in between) reaches subscribers on both nodes, in order, once, when the next
    publish arrives; the publishing node takes the next free seq after it."""
    db = unique_db()
    env = {"RT_REDIS_URL": redis_server.url, "RT_MONGODB_URI": mongo_uri, "RT_MONGODB_DB": db}
    a = node_factory("a", RT_NODE_ID="node-a", **env)
    b = node_factory("b", RT_NODE_ID="node-b", **env)
    store = MongoStore(mongo_uri, db)
    await store.open()
    try:
        ch = chan()
        on_a = await Raw.open(a.url, token("ann"))
        on_b = await Raw.open(b.url, token("ben"))
        for raw in (on_a, on_b):
            await raw.ok("subscribe", channel=ch)
        pub = await Raw.open(a.url, token("alice"))
        await pub.ok("publish", channel=ch, client_msg_id="m1", body=body("1"))
        for raw in (on_a, on_b):
            assert (await raw.push())["seq"] == 1
        stored = await store.messages.append(ch, "ghost", None, "m2", body("2"), 0)
        assert stored.message.seq == 2
        reply = await pub.ok("publish", channel=ch, client_msg_id="m3", body=body("3"))
        assert reply["seq"] == 3  # node a's cached head (1) was stale: it took the next seq
        cmid = await sentinel(pub, ch)
        for raw in (on_a, on_b):
            assert await seqs_then_sentinel(raw, cmid) == [2, 3]
        for raw in (on_a, on_b, pub):
            await raw.close()
    finally:
        await store.close()


# --- the hub, step by step ----------------------------------------------------------------


class Gated:
    """A message store whose `last_seq` (and, when armed, `after`) waits for the test: the
    test decides what happens between the read and the moment the caller sees its answer."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.last_gate: asyncio.Event | None = None
        self.after_gate: asyncio.Event | None = None
        self.read_first = True  # last_seq: read the store, then wait (else wait, then read)
        self.waiting = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def last_seq(self, channel: str) -> int:
        gate = self.last_gate
        if gate is None:
            return int(await self.real.last_seq(channel))
        self.last_gate = None
        value = await self.real.last_seq(channel) if self.read_first else None
        self.waiting.set()
        await gate.wait()
        return int(value if value is not None else await self.real.last_seq(channel))

    async def after(self, channel: str, after_seq: int, limit: int) -> list[Message]:
        gate = self.after_gate
        if gate is not None:
            self.after_gate = None
            self.waiting.set()
            await gate.wait()
        return list(await self.real.after(channel, after_seq, limit))


class Inbox:
    """A local subscriber as the hub sees it: the seqs it was handed, in order."""

    user = "reader"

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.arrived = asyncio.Event()

    def deliver(self, channel: str, seq: int, frame: Frame) -> None:
        assert frame.push["seq"] == seq and frame.push["channel"] == channel
        self.seqs.append(seq)
        self.arrived.set()

    def deliver_event(self, channel: str, frame: Frame) -> None:
        return None

    async def reaches(self, seq: int, timeout: float = 5) -> list[int]:
        async with asyncio.timeout(timeout):
            while not self.seqs or self.seqs[-1] < seq:
                self.arrived.clear()
                await self.arrived.wait()
        return self.seqs


@pytest.fixture
async def parts(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Any]:
    store = SqliteStore(tmp_path)
    await store.open()
    gated = Gated(store.messages)
    hub = Hub(RedisBroker(redis_server.url, timeout_s=2), gated, lambda event: None)  # type: ignore[arg-type]
    await hub.start()
    try:
        yield SimpleNamespace(store=store, gated=gated, hub=hub)
    finally:
        await hub.close()
        await store.close()


async def store_message(store: SqliteStore, ch: str, n: int) -> Message:
    appended = await store.messages.append(ch, "alice", None, f"m{n}", body(str(n)), n)
    assert appended.message.seq == n
    return appended.message


def arrive(hub: Hub, m: Message) -> None:
    """The message as pub/sub hands it to the hub (synchronously: the test picks the order)."""
    hub._on_broker(CHANNEL_TOPIC + m.channel, pack_message(m))


async def test_hub_early_out_of_order_and_duplicate_messages(parts: Any) -> None:
    store, gated, hub = parts.store, parts.gated, parts.hub
    ch = chan()
    m = {n: await store_message(store, ch, n) for n in (1, 2, 3)}
    inbox = Inbox()
    gated.last_gate = release = asyncio.Event()
    adding = asyncio.create_task(hub.add(ch, inbox))
    async with asyncio.timeout(5):
        await gated.waiting.wait()  # the hub has read last_seq (3) and not yet used it
    # Published while the hub initialises: older ones (covered by the subscriber's replay),
    # newer ones out of order, and one twice.
    m[4] = await store_message(store, ch, 4)
    arrive(hub, m[4])
    arrive(hub, m[3])
    m[5], m[6] = await store_message(store, ch, 5), await store_message(store, ch, 6)
    arrive(hub, m[6])
    arrive(hub, m[5])
    arrive(hub, m[4])
    assert inbox.seqs == []  # nothing before the hub knows where the channel stands
    release.set()
    await adding
    assert inbox.seqs == [4, 5, 6]  # at once, from what arrived early
    # A gap: 7 stored but lost by pub/sub, 8 arrives; 8 waits for 7, repaired from the store.
    m[7], m[8] = await store_message(store, ch, 7), await store_message(store, ch, 8)
    arrive(hub, m[8])
    assert inbox.seqs == [4, 5, 6]  # 8 is held back
    assert await inbox.reaches(8) == [4, 5, 6, 7, 8]
    arrive(hub, m[7])  # pub/sub's late copy
    arrive(hub, m[8])
    m[9] = await store_message(store, ch, 9)
    arrive(hub, m[9])
    assert inbox.seqs == [4, 5, 6, 7, 8, 9]


async def test_hub_second_subscriber_shares_the_channel_state(parts: Any) -> None:
    """A second local subscriber joins a channel the hub already receives: no new
    initialisation, and from then on both get the same messages once."""
    store, hub = parts.store, parts.hub
    ch = chan()
    first, second = Inbox(), Inbox()
    await hub.add(ch, first)
    m1 = await store_message(store, ch, 1)
    arrive(hub, m1)
    await hub.add(ch, second)
    m2 = await store_message(store, ch, 2)
    arrive(hub, m2)
    arrive(hub, m1)
    arrive(hub, m2)
    assert first.seqs == [1, 2] and second.seqs == [2]


# --- the replay/live merge of one connection, step by step --------------------------------


class Session:
    """The session an op sees (`protocol.Session`): what it pushes, decoded, in order; the
    `after_reply` callbacks run when the test sends the reply, as the connection does."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.identity = Identity(
            user="carol", roles=frozenset({"user"}), expires_at=time.time() + 60
        )
        self.codec = JSON
        self.id = "s1"
        self.restricted = False
        self.queued = 0
        self._then: list[Any] = []

    def send(self, obj: dict[str, Any]) -> None:
        self.frames.append(json.loads(JSON.encode(obj)))

    def push(self, frame: Frame) -> None:
        self.frames.append(json.loads(frame.encoded(JSON)))

    def close(self, code: int, reason: str = "") -> None:
        raise AssertionError(f"closed {code} {reason}")

    async def bounded(self, call: Any) -> Any:
        return await call

    def after_reply(self, then: Any) -> None:
        self._then.append(then)

    def reply(self, result: dict[str, Any]) -> None:
        """The `ok` reply, then what the op asked to run right after it."""
        self.send({"id": 1, "ok": True, **result})
        then, self._then = self._then, []
        for callback in then:
            callback()

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames if f.get("push") == "message"]


class AllowAll:
    async def check(self, *args: Any) -> None:
        return None


class NoPresence:
    async def add(self, channel: str, user: str) -> None:
        return None

    async def remove(self, channel: str, user: str) -> None:
        return None


def channel_ops(hub: Hub, store: Any) -> ChannelOps:
    limits = Limits()
    return ChannelOps(
        acl=AllowAll(),  # type: ignore[arg-type]
        hub=hub,
        service=ChannelService(store, hub, timeout_s=5, recovery_limit=100),
        roster=NoPresence(),
        sessions=SimpleNamespace(of_user=lambda user: []),  # type: ignore[arg-type]
        verify_envelope=AllowAll().check,  # type: ignore[arg-type]
        limits=ChannelLimits(
            max_subscriptions=limits.max_subscriptions,
            max_body_bytes=limits.max_body_bytes,
            max_pending=limits.send_queue_frames,
            plaintext_namespaces=("public",),
        ),
        metrics=ChannelMetrics(),
        spawn=lambda coro, name: coro.close(),
    )


async def test_replay_live_merge_boundary_is_pushed_once(parts: Any) -> None:
    """subscribe {since_seq: 1} on a channel holding 1..3 that the node already receives:

    1. the hub registers the subscription (live messages now wait in its `pending`);
    2. 4 is stored and arrives live; then the replay reads last_seq = 4 (so 4 is both
       replayed and pending: the boundary);
    3. 5 is stored and arrives live while the replay's messages are read;
    4. the reply, then 2, 3, 4 replayed, then 5 from pending; 4 is not pushed twice;
    5. afterwards live messages go straight out, and a repeated one is dropped."""
    store, gated, hub = parts.store, parts.gated, parts.hub
    ch = chan()
    m = {n: await store_message(store, ch, n) for n in (1, 2, 3)}
    other = Inbox()
    await hub.add(ch, other)  # the node already receives the channel: expects 4
    sock = Session()
    ops = channel_ops(hub, SimpleNamespace(messages=gated))
    gated.read_first = False
    gated.last_gate = read_last = asyncio.Event()
    gated.after_gate = read_after = asyncio.Event()
    subscribing = asyncio.create_task(ops.subscribe(sock, {"channel": ch, "since_seq": 1}))
    async with asyncio.timeout(5):
        await gated.waiting.wait()  # registered with the hub, about to read last_seq
    gated.waiting.clear()
    m[4] = await store_message(store, ch, 4)
    arrive(hub, m[4])
    read_last.set()
    async with asyncio.timeout(5):
        await gated.waiting.wait()  # last_seq read (4); the replay's messages not yet
    m[5] = await store_message(store, ch, 5)
    arrive(hub, m[5])
    assert sock.frames == []  # nothing before the reply
    read_after.set()
    result = await subscribing
    assert result == {"channel": ch, "last_seq": 4, "recovered": True}
    sock.reply(result)  # as the connection's command loop does
    assert sock.frames[0] == {"id": 1, "ok": True, **result}
    assert sock.seqs() == [2, 3, 4, 5]
    m[6] = await store_message(store, ch, 6)
    arrive(hub, m[6])
    assert sock.seqs() == [2, 3, 4, 5, 6]
    subs = ops.of(sock)
    subs.deliver(ch, 5, Frame({"push": "message", "channel": ch, "seq": 5}))  # a repeat
    subs.deliver(ch, 6, Frame({"push": "message", "channel": ch, "seq": 6}))
    assert sock.seqs() == [2, 3, 4, 5, 6]
    assert other.seqs == [4, 5, 6]
    hub.remove(ch, subs)
    hub.remove(ch, other)


async def test_replay_live_merge_when_live_overtakes_the_whole_replay(parts: Any) -> None:
    """Live messages older than the replay's last_seq (already part of the replay) arrive
    while it is read: all are dropped; the pending ones above it keep their order."""
    store, gated, hub = parts.store, parts.gated, parts.hub
    ch = chan()
    m = {n: await store_message(store, ch, n) for n in (1, 2)}
    other = Inbox()
    await hub.add(ch, other)  # expects 3
    sock = Session()
    ops = channel_ops(hub, SimpleNamespace(messages=gated))
    gated.read_first = False
    gated.last_gate = read_last = asyncio.Event()
    subscribing = asyncio.create_task(ops.subscribe(sock, {"channel": ch, "since_seq": 0}))
    async with asyncio.timeout(5):
        await gated.waiting.wait()
    for n in (3, 4):
        m[n] = await store_message(store, ch, n)
        arrive(hub, m[n])  # both pending, both will be in the replay too
    read_last.set()
    gated.waiting.clear()
    # (no gate on `after`: the replay reads 1..4 at once)
    result = await subscribing
    m[5] = await store_message(store, ch, 5)
    arrive(hub, m[5])  # still before the reply is sent: pending
    sock.reply(result)
    assert result["last_seq"] == 4
    assert sock.seqs() == [1, 2, 3, 4, 5]
    hub.remove(ch, ops.of(sock))
    hub.remove(ch, other)
