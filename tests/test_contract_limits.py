"""Every limit of the contract (docs/protocol-v1.md and docs/protocol.md), each at the
boundary, one under and one over, with the accepted case beside each refusal. The nodes run
with small limits so each boundary is cheap to reach; nothing here waits on a fixed sleep
(conditions with deadlines, and sentinel messages to prove that nothing arrived)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Node, base_env, token
from wire import AppDevice, Raw, b64, plain, until

from realtime_safety.crypto.e2ee import message_statement
from realtime_safety.loadtests.fakeproviders import FakeProviders

RECOVERY_LIMIT = 3
MAX_SUBSCRIPTIONS = 4
MAX_BODY = 1000
MAX_FRAME = 4096
MAX_CONNECTIONS = 3
RATE_PER_S = 1
RATE_BURST = 3
TRIGGER_LIMIT = 2

HERE = {"lat": 52.52, "lon": 13.405}


def chan(prefix: str = "public") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def publish_many(raw: Raw, channel: str, count: int, prefix: str = "m") -> list[int]:
    """`count` publishes sent back to back (pipelined), then their replies: the seqs."""
    ids = []
    for i in range(count):
        cid = next(raw.ids)
        ids.append(cid)
        await raw.send(
            {
                "id": cid,
                "op": "publish",
                "channel": channel,
                "client_msg_id": f"{prefix}{i}",
                "body": plain(f"{prefix}{i}"),
            }
        )
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < count:
        frame = await raw.recv(20)
        if frame.get("id") in ids:
            replies[frame["id"]] = frame
        else:
            raw.pushes.append(frame)
    assert all(r["ok"] for r in replies.values()), replies
    return [replies[i]["seq"] for i in ids]


async def sentinel(pub: Raw, channel: str) -> str:
    """Publish a message that must be the next push of a subscriber of `channel`."""
    cmid = f"sentinel-{uuid.uuid4().hex[:8]}"
    await pub.ok("publish", channel=channel, client_msg_id=cmid, body=plain("sentinel"))
    return cmid


async def next_message(raw: Raw) -> dict[str, Any]:
    frame = await raw.push()
    assert frame["push"] == "message", frame
    return frame


async def seqs_then_sentinel(raw: Raw, cmid: str) -> list[int]:
    """The seqs of the message pushes before the sentinel `cmid` (which must come)."""
    seqs = []
    while True:
        frame = await next_message(raw)
        if frame["client_msg_id"] == cmid:
            return seqs
        seqs.append(frame["seq"])


# --- nodes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(
        base_env(
            tmp_path_factory.mktemp("limits"),
            RT_RECOVERY_LIMIT=str(RECOVERY_LIMIT),
            RT_MAX_SUBSCRIPTIONS=str(MAX_SUBSCRIPTIONS),
            RT_MAX_BODY_BYTES=str(MAX_BODY),
            RT_MAX_FRAME_BYTES=str(MAX_FRAME),
            RT_MAX_CONNECTIONS_PER_USER=str(MAX_CONNECTIONS),
            RT_RATE_PER_S="1000",
            RT_RATE_BURST="1000",
        ),
        "limits",
    )
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def rate_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node = Node(
        base_env(
            tmp_path_factory.mktemp("rate"),
            RT_RATE_PER_S=str(RATE_PER_S),
            RT_RATE_BURST=str(RATE_BURST),
        ),
        "rate",
    )
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def alert_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """Alerts with fake providers (nothing here sends SMS: contacts are users)."""
    tmp = tmp_path_factory.mktemp("alerts")
    with FakeProviders() as fakes:
        node = Node(
            base_env(
                tmp / "n",
                RT_ALERT_TRIGGER_LIMIT=str(TRIGGER_LIMIT),
                RT_ALERT_RETRY_BASE_S="0.05",
                **fakes.env(tmp),
            ),
            "alerts",
        )
        node.start()
        yield node
        node.stop()


# --- history pages ---------------------------------------------------------------------


@pytest.fixture(scope="module")
async def long_channel(limits_node: Node) -> str:
    """A channel holding exactly 201 messages (seqs 1..201)."""
    ch = chan()
    raw = await Raw.open(limits_node.url, token("writer"))
    assert await publish_many(raw, ch, 201) == list(range(1, 202))
    await raw.close()
    return ch


def seqs(reply: dict[str, Any]) -> list[int]:
    return [m["seq"] for m in reply["messages"]]


async def test_history_default_page_is_50_and_has_more_at_the_boundary(
    limits_node: Node, long_channel: str
) -> None:
    raw = await Raw.open(limits_node.url, token("reader"))
    newest = await raw.ok("history", channel=long_channel)
    assert seqs(newest) == list(range(152, 202)) and newest["has_more"] is True
    # exactly 50 older messages: one full default page, nothing more
    exact = await raw.ok("history", channel=long_channel, before_seq=51)
    assert seqs(exact) == list(range(1, 51)) and exact["has_more"] is False
    # 51 older messages: the newest 50 of them, and more
    over = await raw.ok("history", channel=long_channel, before_seq=52)
    assert seqs(over) == list(range(2, 52)) and over["has_more"] is True
    # 49: all of them
    under = await raw.ok("history", channel=long_channel, before_seq=50)
    assert seqs(under) == list(range(1, 50)) and under["has_more"] is False
    await raw.close()


async def test_history_limit_is_1_to_200(limits_node: Node, long_channel: str) -> None:
    raw = await Raw.open(limits_node.url, token("reader"))
    top = await raw.ok("history", channel=long_channel, limit=200)
    assert seqs(top) == list(range(2, 202)) and top["has_more"] is True
    exact = await raw.ok("history", channel=long_channel, limit=200, before_seq=201)
    assert seqs(exact) == list(range(1, 201)) and exact["has_more"] is False
    assert await raw.error("history", channel=long_channel, limit=201) == "bad_request"
    one = await raw.ok("history", channel=long_channel, limit=1)
    assert seqs(one) == [201] and one["has_more"] is True
    first = await raw.ok("history", channel=long_channel, limit=1, before_seq=2)
    assert seqs(first) == [1] and first["has_more"] is False
    assert await raw.error("history", channel=long_channel, limit=0) == "bad_request"
    # before_seq 1: nothing is older than the first message
    none = await raw.ok("history", channel=long_channel, before_seq=1)
    assert none["messages"] == [] and none["has_more"] is False
    await raw.close()


# --- recovery ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "replayed", "recovered"),
    [
        (10 - RECOVERY_LIMIT + 1, list(range(10 - RECOVERY_LIMIT + 2, 11)), True),  # under
        (10 - RECOVERY_LIMIT, list(range(10 - RECOVERY_LIMIT + 1, 11)), True),  # exactly
        (10 - RECOVERY_LIMIT - 1, list(range(10 - RECOVERY_LIMIT + 1, 11)), False),  # one more
        (0, list(range(10 - RECOVERY_LIMIT + 1, 11)), False),
        (9, [10], True),
        (10, [], True),  # since_seq == last_seq
        (11, [], True),  # past it
        (1000, [], True),
    ],
)
async def test_recovery_limit_boundary(
    limits_node: Node, since: int, replayed: list[int], recovered: bool
) -> None:
    ch = chan()
    pub = await Raw.open(limits_node.url, token("alice"))
    assert await publish_many(pub, ch, 10) == list(range(1, 11))
    sub = await Raw.open(limits_node.url, token("bob"))
    reply = await sub.ok("subscribe", channel=ch, since_seq=since)
    assert reply["last_seq"] == 10 and reply["recovered"] is recovered
    cmid = await sentinel(pub, ch)  # seq 11, live: after the replay, exactly once
    assert await seqs_then_sentinel(sub, cmid) == replayed
    if not recovered:  # page what was not replayed, from the first replayed seq
        page = await sub.ok("history", channel=ch, before_seq=replayed[0])
        assert seqs(page) == list(range(1, replayed[0])) and page["has_more"] is False
    await pub.close()
    await sub.close()


async def test_subscribe_without_since_seq_replays_nothing(limits_node: Node) -> None:
    ch = chan()
    pub = await Raw.open(limits_node.url, token("alice"))
    await publish_many(pub, ch, 2)
    sub = await Raw.open(limits_node.url, token("bob"))
    reply = await sub.ok("subscribe", channel=ch)
    assert reply == {"id": reply["id"], "ok": True, "channel": ch, "last_seq": 2, "recovered": True}
    cmid = await sentinel(pub, ch)
    assert await seqs_then_sentinel(sub, cmid) == []
    await pub.close()
    await sub.close()


# --- subscriptions and connections -------------------------------------------------------


async def test_max_subscriptions(limits_node: Node) -> None:
    raw = await Raw.open(limits_node.url, token("subber"))
    channels = [chan() for _ in range(MAX_SUBSCRIPTIONS + 1)]
    for ch in channels[:MAX_SUBSCRIPTIONS]:
        await raw.ok("subscribe", channel=ch)
    assert await raw.error("subscribe", channel=channels[-1]) == "too_large"
    # the refused one is not half-subscribed, and a freed slot can be used
    await raw.ok("unsubscribe", channel=channels[0])
    await raw.ok("subscribe", channel=channels[-1])
    assert await raw.error("subscribe", channel=channels[0]) == "too_large"
    pub = await Raw.open(limits_node.url, token("alice"))
    cmid = await sentinel(pub, channels[-1])
    assert (await next_message(raw))["client_msg_id"] == cmid
    await raw.close()
    await pub.close()


async def test_max_connections_per_user(limits_node: Node) -> None:
    user = uid("many")
    conns = [await Raw.open(limits_node.url, token(user)) for _ in range(MAX_CONNECTIONS)]
    extra = await Raw.open(limits_node.url)
    reply = await extra.cmd("auth", token=token(user))
    assert reply["ok"] is False and reply["error"]["code"] == "too_large"
    assert await extra.close_code() == 4008
    other = await Raw.open(limits_node.url, token(uid("other")))  # per user, not per node
    await conns[0].close()

    async def one_more() -> Raw | None:
        raw = await Raw.open(limits_node.url)
        reply = await raw.cmd("auth", token=token(user))
        if reply["ok"]:
            return raw
        assert reply["error"]["code"] == "too_large"
        await raw.close()
        return None

    again = await until(one_more)  # the closed one's slot is free again
    await again.ok("ping")
    for r in (*conns[1:], again, other):
        await r.close()


# --- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("x" * MAX_BODY, None),
        ("x" * (MAX_BODY - 1), None),
        ("x" * (MAX_BODY + 1), "too_large"),
        ("é" * (MAX_BODY // 2), None),  # bytes, not characters
        ("é" * (MAX_BODY // 2) + "x", "too_large"),
    ],
)
async def test_max_body_bytes_plaintext(limits_node: Node, text: str, code: str | None) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    ch = chan()
    reply = await raw.cmd("publish", channel=ch, client_msg_id="b", body=plain(text))
    if code is None:
        assert reply["ok"] and reply["seq"] == 1, reply
        assert (await raw.ok("history", channel=ch))["messages"][0]["body"]["text"] == text
    else:
        assert reply["error"]["code"] == code
        assert (await raw.ok("history", channel=ch))["messages"] == []  # nothing stored
    await raw.close()


@pytest.mark.parametrize(
    ("size", "ok"), [(MAX_BODY - 1, True), (MAX_BODY, True), (MAX_BODY + 1, False)]
)
async def test_max_body_bytes_envelope(limits_node: Node, size: int, ok: bool) -> None:
    user, device = uid("enc"), uid("dev")
    raw = await Raw.open(limits_node.url, token(user))
    app = AppDevice(device)
    await app.register(raw, user)
    ch, cmid, nonce, ct = chan(), "e1", os.urandom(24), os.urandom(size)
    sig = app.keys.signing.sign(message_statement(ch, device, cmid, "k1", nonce, ct)).signature
    body = {"v": 1, "alg": "xchacha20poly1305", "device": device, "key_id": "k1"}
    body |= b64({"nonce": nonce, "ct": ct, "sig": sig})
    reply = await raw.cmd("publish", channel=ch, client_msg_id=cmid, body=body)
    if ok:
        assert reply["ok"] and reply["seq"] == 1, reply
    else:
        assert reply["error"]["code"] == "too_large", reply
    await raw.close()


def padded_ping(cid: int, size: int) -> str:
    """A `ping` command whose JSON text is exactly `size` bytes."""
    base = json.dumps({"id": cid, "op": "ping", "pad": ""}, separators=(",", ":"))
    text = json.dumps(
        {"id": cid, "op": "ping", "pad": "x" * (size - len(base))}, separators=(",", ":")
    )
    assert len(text.encode()) == size
    return text


@pytest.mark.parametrize("size", [MAX_FRAME - 1, MAX_FRAME])
async def test_frame_at_the_size_limit_is_accepted(limits_node: Node, size: int) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    await raw.ws.send(padded_ping(99, size))
    reply = await raw.recv()
    assert reply["id"] == 99 and reply["ok"] is True
    await raw.ok("ping")  # still open
    await raw.close()


async def test_frame_one_byte_over_the_limit_closes_1009(limits_node: Node) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    await raw.ws.send(padded_ping(99, MAX_FRAME + 1))
    assert await raw.close_code() == 1009


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


async def test_nesting_depth_32_ok_33_closes_1007(limits_node: Node) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    # the frame itself is level 1, so a field holding 31 nested arrays makes 32 levels
    reply = await raw.cmd("ping", x=nested(31))
    assert reply["ok"] is True
    await raw.send({"id": 50, "op": "ping", "x": nested(32)})
    assert await raw.close_code() == 1007


async def test_command_id_up_to_2_pow_53_minus_1(limits_node: Node) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    top = 2**53 - 1
    await raw.send({"id": top, "op": "ping"})
    reply = await raw.recv()
    assert reply["id"] == top and reply["ok"] is True
    await raw.send({"id": 0, "op": "ping"})
    assert (await raw.recv())["id"] == 0
    for bad in (top + 1, -1):
        await raw.send({"id": bad, "op": "ping"})
        frame = await raw.recv()
        assert frame.get("push") == "error" and frame["error"]["code"] == "bad_request", frame
    await raw.ok("ping")
    await raw.close()


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("public:" + "a" * (255 - 7), True),  # 255 characters
        ("public:" + "a" * (256 - 7), False),
        ("public:a", True),
        ("public:", False),  # empty rest
    ],
)
async def test_channel_name_length(limits_node: Node, name: str, ok: bool) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    if ok:
        await raw.ok("subscribe", channel=name)
        await raw.ok("unsubscribe", channel=name)
    else:
        assert await raw.error("subscribe", channel=name) == "bad_request"
    await raw.close()


@pytest.mark.parametrize(("length", "ok"), [(1, True), (64, True), (65, False), (0, False)])
async def test_client_msg_id_length(limits_node: Node, length: int, ok: bool) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    reply = await raw.cmd("publish", channel=chan(), client_msg_id="c" * length, body=plain("x"))
    assert reply["ok"] is ok, reply
    if not ok:
        assert reply["error"]["code"] == "bad_request"
    await raw.close()


@pytest.mark.parametrize(
    ("user", "ok"),
    [("u" * 128, True), ("u" * 129, False), ("u", True), ("@u", False), ("u@x.y-z_1", True)],
)
async def test_user_id_rules(limits_node: Node, user: str, ok: bool) -> None:
    raw = await Raw.open(limits_node.url)
    reply = await raw.cmd("auth", token=token(user))
    if ok:
        assert reply["ok"] and reply["user"] == user, reply
        await raw.ok("ping")
        await raw.close()
    else:
        assert reply["error"]["code"] == "unauthorized", reply
        assert await raw.close_code() == 4003


@pytest.mark.parametrize(("limit", "ok"), [(1, True), (1000, True), (1001, False), (0, False)])
async def test_presence_limit(limits_node: Node, limit: int, ok: bool) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    ch = chan()
    await raw.ok("subscribe", channel=ch)
    reply = await raw.cmd("presence", channel=ch, limit=limit)
    if ok:
        assert reply["ok"] and [m["user"] for m in reply["members"]] == ["alice"], reply
    else:
        assert reply["error"]["code"] == "bad_request", reply
    await raw.close()


@pytest.mark.parametrize(("count", "ok"), [(1, True), (100, True), (101, False), (0, False)])
async def test_keys_lookup_takes_1_to_100_users(limits_node: Node, count: int, ok: bool) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    reply = await raw.cmd("keys.lookup", users=[f"nobody{i}" for i in range(count)])
    if ok:
        assert reply["ok"] and reply["devices"] == [], reply
    else:
        assert reply["error"]["code"] == "bad_request", reply
    await raw.close()


@pytest.mark.parametrize(("size", "ok"), [(48, True), (256, True), (47, False), (257, False)])
async def test_keys_share_sealed_box_is_48_to_256_bytes(
    limits_node: Node, size: int, ok: bool
) -> None:
    user, device = uid("kay"), uid("dev")
    raw = await Raw.open(limits_node.url, token(user))
    await AppDevice(device).register(raw, user)
    sealed = b64({user: {device: os.urandom(size)}})
    reply = await raw.cmd("keys.share", channel=chan(), key_id="k1", sealed=sealed)
    if ok:
        assert reply["ok"] and reply["conflicts"] == [], reply
    else:
        assert reply["error"]["code"] == "bad_request", reply
    await raw.close()


@pytest.mark.parametrize(("length", "ok"), [(1, True), (500, True), (501, False), (0, False)])
async def test_report_reason_is_1_to_500_characters(
    limits_node: Node, length: int, ok: bool
) -> None:
    raw = await Raw.open(limits_node.url, token("alice"))
    ch = chan()
    await raw.ok("publish", channel=ch, client_msg_id="r", body=plain("r"))
    reply = await raw.cmd("report", channel=ch, seq=1, reason="r" * length)
    if ok:
        assert reply["ok"] and reply["verified"] is False, reply
    else:
        assert reply["error"]["code"] == "bad_request", reply
    await raw.close()


async def test_typing_once_per_second_per_user_and_channel(limits_node: Node) -> None:
    user = uid("tina")
    raw = await Raw.open(limits_node.url, token(user))
    watcher = await Raw.open(limits_node.url, token(uid("walt")))
    ch, other = chan(), chan()
    await watcher.ok("subscribe", channel=ch)
    await raw.ok("typing", channel=ch)
    reply = await raw.cmd("typing", channel=ch)
    assert reply["error"]["code"] == "rate_limited"
    assert 0 < reply["error"]["retry_after_ms"] <= 1001
    await raw.ok("typing", channel=other)  # per channel
    await asyncio.sleep(reply["error"]["retry_after_ms"] / 1000)  # as told
    await raw.ok("typing", channel=ch)
    # the watcher saw exactly two notices on its channel, then the sentinel
    cmid = await sentinel(raw, ch)
    pushes = [await watcher.push() for _ in range(3)]
    assert [p["push"] for p in pushes] == ["typing", "typing", "message"]
    assert pushes[2]["client_msg_id"] == cmid
    await raw.close()
    await watcher.close()


# --- command rate ------------------------------------------------------------------------


async def pipelined_pings(raw: Raw, count: int) -> list[dict[str, Any]]:
    """`count` pings sent together (the server takes them in one go), then their replies."""
    ids = [next(raw.ids) for _ in range(count)]
    for cid in ids:
        await raw.send({"id": cid, "op": "ping"})
    return [await raw.recv() for _ in ids]


async def test_rate_limit_burst_then_refill(rate_node: Node) -> None:
    raw = await Raw.open(rate_node.url, token(uid("rate")))
    replies = await pipelined_pings(raw, RATE_BURST + 1)
    assert [r["ok"] for r in replies] == [True] * RATE_BURST + [False]
    error = replies[-1]["error"]
    assert error["code"] == "rate_limited"
    # one token takes 1/RATE_PER_S s to come back
    assert 0 < error["retry_after_ms"] <= 1000 // RATE_PER_S + 1
    await asyncio.sleep(error["retry_after_ms"] / 1000)  # what the server told us to wait
    await raw.ok("ping")  # the refilled token
    assert await raw.error("ping") == "rate_limited"  # and only that one
    await raw.close()


async def test_rate_limit_refusals_up_to_the_burst_keep_the_connection(rate_node: Node) -> None:
    raw = await Raw.open(rate_node.url, token(uid("flood")))
    replies = await pipelined_pings(raw, 2 * RATE_BURST)
    assert [r["ok"] for r in replies] == [True] * RATE_BURST + [False] * RATE_BURST
    retry = max(r["error"]["retry_after_ms"] for r in replies[RATE_BURST:])
    await asyncio.sleep(retry / 1000)
    await raw.ok("ping")  # RATE_BURST refusals in 10 s: still open
    # one more refusal within the 10 s: flooding
    await raw.send({"id": next(raw.ids), "op": "ping"})
    assert await raw.close_code() == 4008


# --- moderation --------------------------------------------------------------------------


async def test_timed_ban_expires(limits_node: Node) -> None:
    mod = await Raw.open(limits_node.url, token(uid("mia"), roles=["user", "moderator"]))
    user = uid("bert")
    raw = await Raw.open(limits_node.url, token(user))
    ch = chan()
    assert await mod.error("mod.ban", user=user, channel=ch, duration_s=0, reason="r") == (
        "bad_request"
    )
    ban = await mod.ok("mod.ban", user=user, channel=ch, duration_s=1, reason="spam")
    now = time.time() * 1000
    assert ban["channel"] == ch and now < ban["until"] <= now + 1000 + 50
    assert await raw.error("subscribe", channel=ch) == "forbidden"
    assert await raw.error("publish", channel=ch, client_msg_id="p", body=plain("x")) == (
        "forbidden"
    )
    await raw.ok("subscribe", channel=chan())  # only that channel

    async def allowed() -> bool:
        reply = await raw.cmd("publish", channel=ch, client_msg_id="p", body=plain("x"))
        if reply["ok"]:
            return True
        assert reply["error"]["code"] == "forbidden"
        assert time.time() * 1000 < ban["until"] + 100  # refused only until `until`
        return False

    await until(allowed, 5)
    assert time.time() * 1000 >= ban["until"]
    await raw.ok("subscribe", channel=ch)
    await raw.close()
    await mod.close()


async def test_timed_global_ban_expires(limits_node: Node) -> None:
    mod = await Raw.open(limits_node.url, token(uid("mia"), roles=["user", "moderator"]))
    user = uid("gus")
    raw = await Raw.open(limits_node.url, token(user))
    ban = await mod.ok("mod.ban", user=user, duration_s=1, reason="spam")
    assert ban["channel"] is None
    assert await raw.close_code() == 4009

    async def auth_ok() -> bool:
        attempt = await Raw.open(limits_node.url)
        asked = time.time() * 1000  # the server judged the ban at this time or later
        reply = await attempt.cmd("auth", token=token(user))
        assert reply["ok"], reply  # a banned user keeps the alert ops: auth succeeds
        if "banned" not in reply:
            await attempt.close()
            return True
        assert reply["banned"] == "spam"
        assert asked < ban["until"] + 100  # still banned when asked, not a late expiry
        # Every chat op asks again: the ban may run out between the auth and this subscribe.
        sub = await attempt.cmd("subscribe", channel="public:x")
        await attempt.close()
        if sub["ok"]:
            assert time.time() * 1000 >= ban["until"] - 100, sub  # only once it has run out
            return True
        assert sub["error"]["code"] == "forbidden", sub
        return False

    assert not await auth_ok()  # refused before
    await until(auth_ok, 5)
    assert time.time() * 1000 >= ban["until"]
    await mod.close()


async def test_mod_watch_at_most_20_patterns(limits_node: Node) -> None:
    mod = await Raw.open(limits_node.url, token(uid("mia"), roles=["user", "moderator"]))
    for i in range(20):
        reply = await mod.ok("mod.watch", pattern=f"public:p{i}-*")
    assert len(reply["patterns"]) == 20
    assert await mod.error("mod.watch", pattern="public:p20-*") == "too_large"
    again = await mod.ok("mod.watch", pattern="public:p0-*")  # already watched: no new one
    assert len(again["patterns"]) == 20
    left = await mod.ok("mod.unwatch", pattern="public:p0-*")
    assert len(left["patterns"]) == 19
    assert len((await mod.ok("mod.watch", pattern="public:p20-*"))["patterns"]) == 20
    # per connection: another connection of the same moderator starts empty
    other = await Raw.open(limits_node.url, token("mia2", roles=["user", "moderator"]))
    assert (await other.ok("mod.watch", pattern="public:*"))["patterns"] == ["public:*"]
    # the 21st refused pattern is not watched; the 20th is
    pub = await Raw.open(limits_node.url, token("alice"))
    ch = f"public:p20-{uuid.uuid4().hex[:6]}"
    await pub.ok("publish", channel=ch, client_msg_id="w", body=plain("w"))
    assert (await mod.push())["channel"] == ch
    for r in (mod, other, pub):
        await r.close()


# --- alerts ------------------------------------------------------------------------------


def contacts(node: Node, owner: str, *users: str) -> None:
    r = node.api(
        "PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"user": u} for u in users]}
    )
    assert r.status_code == 200, r.text


async def test_alert_ops_after_resolve(alert_node: Node) -> None:
    owner, friend = uid("olga"), uid("bob")
    contacts(alert_node, owner, friend)
    olga = await Raw.open(alert_node.url, token(owner))
    bob = await Raw.open(alert_node.url, token(friend))
    cid = "press-1"
    reply = await olga.ok("alert.trigger", kind="sos", location=HERE, client_alert_id=cid)
    alert_id = reply["alert_id"]
    expected = hashlib.sha256(owner.encode() + b"\x00" + cid.encode()).hexdigest()[:32]
    assert alert_id == expected and reply["channel"] == f"alert:{alert_id}"
    await olga.ok("alert.location", alert_id=alert_id, location=HERE)  # active: ok
    resolved = await olga.ok("alert.resolve", alert_id=alert_id, outcome="safe")
    assert resolved["state"] == "resolved"
    assert await olga.error("alert.location", alert_id=alert_id, location=HERE) == "conflict"
    again = await olga.ok("alert.resolve", alert_id=alert_id, outcome="safe")
    assert again == {**resolved, "id": again["id"]}
    # alert.ack: "recipients only", no rule about the state, so a late ack is taken
    await bob.ok("alert.ack", alert_id=alert_id)
    status = await olga.ok("alert.status", alert_id=alert_id)
    assert status["state"] == "resolved" and status["outcome"] == "safe"
    for r in (olga, bob):
        await r.close()


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("note", "n" * 500, True),
        ("note", "n" * 501, False),
        ("accuracy_m", 0, True),
        ("accuracy_m", 100_000, True),
        ("accuracy_m", 100_000.5, False),
        ("accuracy_m", -0.5, False),
        ("ts_offset", -86_400_000 + 10_000, True),  # within the last day
        ("ts_offset", -86_400_000 - 10_000, False),
        ("ts_offset", 50_000, True),  # clock skew: up to 1 min ahead
        ("ts_offset", 70_000, False),
    ],
)
async def test_alert_trigger_field_limits(
    alert_node: Node, field: str, value: Any, ok: bool
) -> None:
    raw = await Raw.open(alert_node.url, token(uid("val")))
    location: dict[str, Any] = dict(HERE)
    args: dict[str, Any] = {}
    if field == "note":
        args["note"] = value
    elif field == "accuracy_m":
        location["accuracy_m"] = value
    else:
        location["ts"] = int(time.time() * 1000) + value
    reply = await raw.cmd(
        "alert.trigger", kind="other", location=location, client_alert_id="v", **args
    )
    assert reply["ok"] is ok, reply
    if not ok:
        assert reply["error"]["code"] == "bad_request"
    await raw.close()


async def test_alert_trigger_limit(alert_node: Node) -> None:
    owner = uid("ulla")
    raw = await Raw.open(alert_node.url, token(owner))
    ids = []
    for i in range(TRIGGER_LIMIT):
        reply = await raw.ok("alert.trigger", kind="fire", location=HERE, client_alert_id=f"t{i}")
        ids.append(reply["alert_id"])
    over = await raw.cmd("alert.trigger", kind="fire", location=HERE, client_alert_id="over")
    assert over["error"]["code"] == "rate_limited"
    assert 0 < over["error"]["retry_after_ms"] <= 600_000
    again = await raw.cmd("alert.trigger", kind="fire", location=HERE, client_alert_id="over")
    assert again["error"]["code"] == "rate_limited"  # a retry of a refused trigger
    # a retry of an accepted one names the same alert
    retry = await raw.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="t0")
    assert retry["alert_id"] == ids[0]
    # the refused trigger stored nothing
    refused = hashlib.sha256(owner.encode() + b"\x00over").hexdigest()[:32]
    assert await raw.error("alert.status", alert_id=refused) == "not_found"
    # per user: someone else may still trigger
    other = await Raw.open(alert_node.url, token(uid("vera")))
    await other.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="over")
    await raw.close()
    await other.close()


async def test_sms_dead_lettered_after_six_attempts(tmp_path: Path) -> None:
    with FakeProviders() as fakes:
        node = Node(
            base_env(tmp_path / "dl", RT_ALERT_RETRY_BASE_S="0.02", **fakes.env(tmp_path)),
            "deadletter",
        )
        node.env["RT_PUBLIC_URL"] = node.http
        node.start()
        try:
            owner, phone = uid("paula"), "+15557770001"
            r = node.api(
                "PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": phone}]}
            )
            assert r.status_code == 200, r.text
            # exactly six failures: a seventh attempt would be answered 201 (and show `sent`)
            fakes.script.twilio_fail = [500] * 6
            raw = await Raw.open(node.url, token(owner))
            alert_id = (
                await raw.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="d")
            )["alert_id"]

            async def sms() -> dict[str, Any] | None:
                status = await raw.ok("alert.status", alert_id=alert_id)
                (rec,) = [r for r in status["recipients"] if r["route"] == "sms"]
                return rec if rec["status"] != "queued" else None

            rec = await until(sms, 20)
            assert rec["to"] == phone and rec["status"] == "failed", rec
            assert rec["attempts"] == 6 and rec["error"], rec
            assert len(fakes.sms_to(phone)) == 6
            assert fakes.accepted_sms == []
            await raw.close()
        finally:
            node.stop()
