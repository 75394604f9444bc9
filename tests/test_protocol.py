"""docs/protocol-v1.md sections 1-4 against one real server process on embedded defaults."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import uuid
from typing import Any

import jwt
import msgpack
import pytest
from conftest import SECRET, Node, token
from websockets.asyncio.client import connect
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from wire import (
    AppDevice,
    Raw,
    envelope,
    plain,
    read_close_code,
    sentinel,
    stalled_subscriber,
    until,
)


def chan(prefix: str = "public") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


# --- section 1: connection ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["rt.v1.json"], "rt.v1.json"),
        (["rt.v1.msgpack"], "rt.v1.msgpack"),
        (["x.unknown", "rt.v1.msgpack", "rt.v1.json"], "rt.v1.msgpack"),
        (None, None),
    ],
)
async def test_subprotocol_negotiation(
    single_node: Node, offered: list[str] | None, chosen: str | None
) -> None:
    ws = await connect(single_node.url, subprotocols=offered)  # type: ignore[arg-type]
    assert ws.subprotocol == chosen
    raw = Raw(ws, chosen or "rt.v1.json")  # no subprotocol: the server speaks JSON
    reply = await raw.ok("auth", token=token("alice"))
    assert reply["user"] == "alice" and reply["roles"] == ["user"]
    assert reply["session"] and reply["node"]
    await raw.close()


async def test_auth_timeout_closes_4001(single_node: Node) -> None:
    raw = await Raw.open(single_node.url)
    assert await raw.close_code() == 4001


async def test_first_frame_must_be_auth(single_node: Node) -> None:
    raw = await Raw.open(single_node.url)
    reply = await raw.cmd("ping")
    assert reply["error"]["code"] == "unauthorized"
    assert await raw.close_code() == 4003


@pytest.mark.parametrize(
    "case", ["garbage", "expired", "alg_none", "wrong_key", "bad_role", "no_exp", "server_user"]
)
async def test_bad_tokens_close_4003(single_node: Node, case: str) -> None:
    now = int(time.time())
    if case == "garbage":
        tok = "not.a.jwt"
    elif case == "expired":
        tok = token("alice", ttl=-10)
    elif case == "alg_none":
        header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        body = (
            base64.urlsafe_b64encode(json.dumps({"sub": "alice", "exp": now + 600}).encode())
            .rstrip(b"=")
            .decode()
        )
        tok = f"{header}.{body}."
    elif case == "wrong_key":
        tok = jwt.encode({"sub": "alice", "exp": now + 600}, "other" * 10, algorithm="HS256")
    elif case == "bad_role":
        tok = token("alice", roles=["admin"])
    elif case == "no_exp":
        tok = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    else:
        tok = token("@server")
    raw = await Raw.open(single_node.url)
    reply = await raw.cmd("auth", token=tok)
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
    assert await raw.close_code() == 4003


async def test_token_expiry_closes_4003_unless_refreshed(single_node: Node) -> None:
    short = await Raw.open(single_node.url, token("alice", ttl=1.5))
    refreshed = await Raw.open(single_node.url, token("alice", ttl=1.5))
    reply = await refreshed.ok("refresh", token=token("alice", ttl=600))
    assert reply["expires_at"] > time.time() + 500
    assert await refreshed.error("refresh", token=token("mallory")) == "forbidden"
    assert await short.close_code(timeout=5) == 4003
    await refreshed.ok("ping")
    await refreshed.close()


# --- section 2: frames -------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame", [b"\xff\xfe not json", "[1, 2, 3]", '"just a string"', '{"id": 1, "op": NaN}']
)
async def test_undecodable_json_closes_1007(single_node: Node, frame: str | bytes) -> None:
    raw = await Raw.open(single_node.url, token("alice"))
    await raw.ws.send(frame)
    assert await raw.close_code() == 1007


@pytest.mark.parametrize("frame", [b"\xc1", msgpack.packb([1, 2]), "text frame"])
async def test_undecodable_msgpack_closes_1007(single_node: Node, frame: str | bytes) -> None:
    raw = await Raw.open(single_node.url, token("alice"), proto="rt.v1.msgpack")
    await raw.ws.send(frame)
    assert await raw.close_code() == 1007


async def test_oversize_frame_closes_1009(single_node: Node) -> None:
    raw = await Raw.open(single_node.url, token("alice"), max_size=None)
    await raw.send(
        {
            "id": 1,
            "op": "publish",
            "channel": "public:x",
            "client_msg_id": "big",
            "body": plain("x" * (129 * 1024)),
        }
    )
    assert await raw.close_code() == 1009


async def test_invalid_commands_get_errors_and_the_connection_stays(single_node: Node) -> None:
    raw = await Raw.open(single_node.url, token("alice"))
    await raw.send({"op": "ping"})  # no id: a push error
    push = await raw.push()
    assert push["push"] == "error" and push["error"]["code"] == "bad_request"
    await raw.send({"id": "seven", "op": "ping"})
    assert (await raw.push())["error"]["code"] == "bad_request"
    assert await raw.error("no.such.op") == "bad_request"
    assert await raw.error("auth", token=token("alice")) == "bad_request"
    assert await raw.error("subscribe") == "bad_request"
    assert await raw.error("publish", channel="public:x", body=plain("a")) == "bad_request"
    assert (
        await raw.error("publish", channel="public:x", client_msg_id="x" * 65, body=plain("a"))
        == "bad_request"
    )
    assert await raw.error("history", channel="public:x", limit=201) == "bad_request"
    assert await raw.error("history", channel="public:x", before_seq=-1) == "bad_request"
    reply = await raw.ok("ping")
    assert abs(reply["ts"] - time.time() * 1000) < 5000
    await raw.close()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "nonamespace",
        "public:",
        "public:has space",
        "public:ü",
        "public:" + "a" * 250,
        "bogus:x",
        7,
    ],
)
async def test_bad_channel_names(single_node: Node, name: object) -> None:
    raw = await Raw.open(single_node.url, token("alice"))
    assert await raw.error("subscribe", channel=name) == "bad_request"
    assert (
        await raw.error("publish", channel=name, client_msg_id="a", body=plain("x"))
        == "bad_request"
    )
    await raw.close()


async def test_flooding_is_rate_limited_then_closed_4008(single_node: Node) -> None:
    raw = await Raw.open(single_node.url, token("flood"))
    codes = []
    for i in range(1500):
        try:
            await raw.send({"id": i + 10, "op": "ping"})
        except Exception:
            break
    try:
        while True:
            frame = await raw.recv(5)
            if not frame.get("ok"):
                codes.append(frame["error"])
    except Exception:
        pass
    limited = [c for c in codes if c["code"] == "rate_limited"]
    assert limited and all(c["retry_after_ms"] > 0 for c in limited)
    assert raw.ws.close_code == 4008


# --- section 4: channels -----------------------------------------------------------------


async def test_access_rules_per_namespace(single_node: Node) -> None:
    alice = await Raw.open(single_node.url, token("alice"))
    mod = await Raw.open(single_node.url, token("mia", roles=["user", "moderator"]))
    room = chan("room")
    assert await alice.error("subscribe", channel=room) == "forbidden"
    assert (
        await alice.error("publish", channel=room, client_msg_id="1", body=envelope(b64=True))
        == "forbidden"
    )
    assert await alice.error("history", channel=room) == "forbidden"
    assert await alice.error("typing", channel=room) == "forbidden"
    assert await alice.error("read", channel=room, seq=1) == "forbidden"
    await alice.ok("subscribe", channel="user:alice")
    assert await alice.error("subscribe", channel="user:bob") == "forbidden"
    assert await alice.error("history", channel="user:bob") == "forbidden"
    assert (
        await alice.error("publish", channel="user:alice", client_msg_id="1", body=plain("x"))
        == "forbidden"
    )
    assert await alice.error("subscribe", channel="alert:a1") == "forbidden"
    await mod.ok("subscribe", channel="alert:a1")
    assert (
        await mod.error("publish", channel="alert:a1", client_msg_id="1", body=plain("x"))
        == "forbidden"
    )
    await alice.close()
    await mod.close()


async def test_room_membership_through_the_server_api(single_node: Node) -> None:
    room = chan("room")
    assert (
        single_node.api(
            "PUT", f"/v1/channels/{room}/members/bob", headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    bob = await Raw.open(single_node.url, token("bob"))
    assert await bob.error("subscribe", channel=room) == "forbidden"  # cached as not a member
    single_node.add_member(room, "bob")
    single_node.add_member(room, "carol")
    assert single_node.api("PUT", f"/v1/channels/{room}/members/bob").status_code == 200
    r = single_node.api("GET", f"/v1/channels/{room}/members")
    assert r.json()["members"] == ["bob", "carol"]
    await bob.ok("subscribe", channel=room)
    phone = AppDevice(f"bob-{uuid.uuid4().hex[:6]}")
    await phone.register(bob, "bob")
    reply = await bob.ok(
        "publish", channel=room, client_msg_id="m1", body=phone.envelope(room, "m1")
    )
    assert reply["seq"] == 1
    assert (await bob.push())["seq"] == 1
    assert single_node.api("DELETE", f"/v1/channels/{room}/members/bob").status_code == 204
    push = await bob.push()
    assert push == {"push": "unsubscribed", "channel": room, "reason": "removed"}
    assert (
        await bob.error(
            "publish", channel=room, client_msg_id="m2", body=phone.envelope(room, "m2")
        )
        == "forbidden"
    )
    assert single_node.api("DELETE", f"/v1/channels/{room}/members/bob").status_code == 404
    assert single_node.api("PUT", "/v1/channels/public:x/members/bob").status_code == 400
    await bob.close()


async def test_publish_seq_idempotency_and_push_shape(single_node: Node) -> None:
    ch = chan()
    sub = await Raw.open(single_node.url, token("bob"))
    pub = await Raw.open(single_node.url, token("alice", device="phone"))
    assert (await sub.ok("subscribe", channel=ch)) | {"id": 0} == {
        "id": 0,
        "ok": True,
        "channel": ch,
        "last_seq": 0,
        "recovered": True,
    }
    seqs = [
        (await pub.ok("publish", channel=ch, client_msg_id=f"c{i}", body=plain(f"m{i}")))["seq"]
        for i in range(5)
    ]
    assert seqs == [1, 2, 3, 4, 5]
    again = await pub.ok("publish", channel=ch, client_msg_id="c2", body=plain("other"))
    assert again["seq"] == 3 and again["duplicate"] is True
    # Another sender may reuse the same client_msg_id: it is per sender.
    other = await sub.ok("publish", channel=ch, client_msg_id="c2", body=plain("bob"))
    assert other["seq"] == 6
    pushes = [await sub.push() for _ in range(6)]
    assert [p["seq"] for p in pushes] == [1, 2, 3, 4, 5, 6]
    first = pushes[0]
    assert set(first) == {"push", "channel", "seq", "ts", "from", "client_msg_id", "body"}
    assert first["from"] == {"user": "alice", "device": "phone"}
    assert first["body"] == plain("m0") and first["client_msg_id"] == "c0"
    assert abs(first["ts"] - time.time() * 1000) < 10_000
    # the duplicate was not fanned out again: the next push is the next message
    await pub.ok("publish", channel=ch, client_msg_id="c6", body=plain("m6"))
    await sub.nothing_before({"seq": 7, "client_msg_id": "c6"})
    await sub.close()
    await pub.close()


async def test_envelope_bytes_cross_wire_formats(single_node: Node) -> None:
    room = chan("room")
    single_node.add_member(room, "alice")
    single_node.add_member(room, "bob")
    j = await Raw.open(single_node.url, token("bob"))
    m = await Raw.open(single_node.url, token("alice"), proto="rt.v1.msgpack")
    await j.ok("subscribe", channel=room)
    laptop = AppDevice(f"laptop-{uuid.uuid4().hex[:6]}")
    await laptop.register(m, "alice")
    phone = AppDevice(f"phone-{uuid.uuid4().hex[:6]}", key=laptop.channel_key)
    await phone.register(j, "bob")
    env = laptop.envelope(room, "e1", json=False)
    await m.ok("publish", channel=room, client_msg_id="e1", body=env)
    push = await j.push()
    assert push["from"] == {"user": "alice", "device": laptop.keys.device}
    for field in ("nonce", "ct", "sig", "frank"):
        assert base64.b64decode(push["body"][field], validate=True) == env[field]
    assert len(base64.b64decode(push["body"]["ftag"])) == 32  # the server's franking tag
    history = await m.ok("history", channel=room)
    stored = history["messages"][0]["body"]
    assert {k: stored[k] for k in env} == env  # raw bytes in msgpack
    # JSON senders use padded base64
    env_b64 = phone.envelope(room, "e2")
    await j.ok("publish", channel=room, client_msg_id="e2", body=env_b64)
    history = await m.ok("history", channel=room)
    assert history["messages"][1]["body"]["ct"] == base64.b64decode(env_b64["ct"])
    # shapes and sizes are checked
    bad = dict(env_b64, nonce=base64.b64encode(b"short").decode())
    assert await j.error("publish", channel=room, client_msg_id="e3", body=bad) == "bad_request"
    bad = dict(env_b64, ct="not base64!")
    assert await j.error("publish", channel=room, client_msg_id="e4", body=bad) == "bad_request"
    assert (
        await j.error("publish", channel=room, client_msg_id="e5", body=plain("secret"))
        == "forbidden"
    )
    big = envelope(size=70 * 1024)
    assert await m.error("publish", channel=room, client_msg_id="e6", body=big) == "too_large"
    await j.close()
    await m.close()


async def test_subscribe_since_seq_recovers_exactly_the_missed_messages(single_node: Node) -> None:
    ch = chan()
    pub = await Raw.open(single_node.url, token("alice"))
    for i in range(4):
        await pub.ok("publish", channel=ch, client_msg_id=f"a{i}", body=plain(str(i)))
    sub = await Raw.open(single_node.url, token("bob"))
    reply = await sub.ok("subscribe", channel=ch, since_seq=1)
    assert reply["last_seq"] == 4 and reply["recovered"] is True
    assert [(await sub.push())["seq"] for _ in range(3)] == [2, 3, 4]
    await pub.ok("publish", channel=ch, client_msg_id="a4", body=plain("4"))
    assert (await sub.push())["seq"] == 5
    # more than recovery_limit (5 on this node) missed: the newest 5, recovered false
    for i in range(5, 12):
        await pub.ok("publish", channel=ch, client_msg_id=f"a{i}", body=plain(str(i)))
    await sub.nothing_before({"seq": 6})  # nothing recovered twice: 6 follows 5
    late = await Raw.open(single_node.url, token("carol"))
    reply = await late.ok("subscribe", channel=ch, since_seq=2)
    assert reply["last_seq"] == 12 and reply["recovered"] is False
    assert [(await late.push())["seq"] for _ in range(5)] == [8, 9, 10, 11, 12]
    await pub.ok("publish", channel=ch, client_msg_id="a12", body=plain("12"))
    await late.nothing_before({"seq": 13})  # nothing older came after the newest 5
    page = await late.ok("history", channel=ch, before_seq=8, limit=3)
    assert [m["seq"] for m in page["messages"]] == [5, 6, 7] and page["has_more"] is True
    for r in (pub, sub, late):
        await r.close()


async def test_recovery_while_live_messages_arrive_has_no_gap_or_duplicate(
    single_node: Node,
) -> None:
    ch = chan()
    pub = await Raw.open(single_node.url, token("alice"))
    for i in range(3):
        await pub.ok("publish", channel=ch, client_msg_id=f"pre{i}", body=plain("x"))
    stop = asyncio.Event()
    published = [0]

    async def publish_forever() -> int:
        while not stop.is_set():
            n = published[0]
            await pub.ok("publish", channel=ch, client_msg_id=f"live{n}", body=plain("y"))
            published[0] += 1
            # Pacing, not synchronisation: live traffic within this node's command rate limit.
            await asyncio.sleep(0.002)
        return published[0]

    task = asyncio.create_task(publish_forever())
    await until(lambda: published[0] >= 10, what="live traffic before the subscribe")
    sub = await Raw.open(single_node.url, token("bob"))
    reply = await sub.ok("subscribe", channel=ch, since_seq=0)  # limit 5: newest 5, then live
    at_subscribe = published[0]
    await until(lambda: published[0] >= at_subscribe + 30, what="live traffic after it")
    stop.set()
    await task
    last = (await pub.ok("history", channel=ch, limit=1))["messages"][0]["seq"]
    seqs = []
    while not seqs or seqs[-1] < last:
        seqs.append((await sub.push())["seq"])
    assert seqs == list(range(seqs[0], last + 1))
    assert seqs[0] == reply["last_seq"] - 4  # the recovered part, then everything live
    await sub.nothing_before(await sentinel(pub, ch))  # and nothing twice after the last
    await pub.close()
    await sub.close()


async def test_history_paging_and_read_markers(single_node: Node) -> None:
    ch = chan()
    raw = await Raw.open(single_node.url, token("alice"))
    for i in range(7):
        await raw.ok("publish", channel=ch, client_msg_id=f"h{i}", body=plain(str(i)))
    newest = await raw.ok("history", channel=ch, limit=3)
    assert [m["seq"] for m in newest["messages"]] == [5, 6, 7] and newest["has_more"]
    assert newest["read_seq"] == 0
    older = await raw.ok("history", channel=ch, before_seq=5, limit=50)
    assert [m["seq"] for m in older["messages"]] == [1, 2, 3, 4] and not older["has_more"]
    assert (await raw.ok("history", channel=ch))["messages"][0]["body"] == plain("0")
    assert (await raw.ok("read", channel=ch, seq=5))["read_seq"] == 5
    assert (await raw.ok("read", channel=ch, seq=3))["read_seq"] == 5  # never goes back
    assert (await raw.ok("history", channel=ch, limit=1))["read_seq"] == 5
    assert await raw.error("read", channel=ch) == "bad_request"
    empty = await raw.ok("history", channel=chan())
    assert empty["messages"] == [] and empty["has_more"] is False
    await raw.close()


async def test_typing_goes_to_the_others_only_and_is_limited(single_node: Node) -> None:
    ch = chan()
    alice = await Raw.open(single_node.url, token("alice"))
    bob = await Raw.open(single_node.url, token("bob"))
    await alice.ok("subscribe", channel=ch)
    await bob.ok("subscribe", channel=ch)
    await alice.ok("typing", channel=ch)
    assert await bob.push() == {"push": "typing", "channel": ch, "user": "alice"}
    assert await alice.error("typing", channel=ch) == "rate_limited"
    assert (await bob.ok("history", channel=ch))["messages"] == []  # never stored
    await alice.nothing_before(await sentinel(bob, ch))  # her own typing is not echoed
    await alice.close()
    await bob.close()


async def test_unsubscribe_stops_pushes_and_double_subscribe_conflicts(single_node: Node) -> None:
    ch = chan()
    sub = await Raw.open(single_node.url, token("bob"))
    pub = await Raw.open(single_node.url, token("alice"))
    await sub.ok("subscribe", channel=ch)
    assert await sub.error("subscribe", channel=ch) == "conflict"
    await sub.ok("unsubscribe", channel=ch)
    await pub.ok("publish", channel=ch, client_msg_id="u1", body=plain("x"))
    await sub.quiet()  # one node: had u1 been pushed, it would be queued before the pong
    for i in range(20):
        await sub.ok("subscribe", channel=f"public:many{i}")
    assert await sub.error("subscribe", channel="public:one-too-many") == "too_large"
    await sub.close()
    await pub.close()


async def test_slow_consumer_is_closed_4008(single_node: Node) -> None:
    ch = chan()
    slow = stalled_subscriber(single_node.port, token("slow"), ch)
    pub = await Raw.open(single_node.url, token("fast"))
    body = plain("z" * 30_000)
    for i in range(400):  # ~12 MB towards a reader that never reads; the queue holds 64
        await pub.ok("publish", channel=ch, client_msg_id=f"s{i}", body=body)
    assert await asyncio.to_thread(read_close_code, slow) == 4008
    slow[0].close()
    await pub.ok("ping")  # the publisher and the node are unaffected
    await pub.close()


async def test_reader_that_stalls_then_catches_up_gets_everything_in_order(
    single_node: Node,
) -> None:
    """Frames go straight to a writable socket and queue behind a full one; switching
    between the two (many times, while messages keep coming) never reorders, drops or
    repeats a frame."""
    ch = chan()
    sock, proto = stalled_subscriber(single_node.port, token("napper"), ch)
    pub = await Raw.open(single_node.url, token("talker"))
    body = plain("y" * 30_000)
    for i in range(40):  # ~1.2 MB: far past the socket buffers, within the 64-frame queue
        await pub.ok("publish", channel=ch, client_msg_id=f"n{i}", body=body)

    def drain(total: int) -> list[int]:  # a slow reader: small reads, short naps
        seqs: list[int] = []
        sock.settimeout(10)
        while len(seqs) < total:
            proto.receive_data(sock.recv(8192))
            time.sleep(0.0005)  # the behaviour under test: a reader slower than the writer
            for event in proto.events_received():
                if isinstance(event, WsFrame) and event.opcode is Opcode.TEXT:
                    push = json.loads(event.data)
                    if push.get("push") == "message":
                        seqs.append(push["seq"])
        return seqs

    reader = asyncio.ensure_future(asyncio.to_thread(drain, 100))
    for i in range(40, 100):  # while it catches up
        await pub.ok("publish", channel=ch, client_msg_id=f"n{i}", body=body)
        await asyncio.sleep(0.002)  # pacing: messages keep coming while the reader catches up
    seqs = await reader
    assert seqs == list(range(seqs[0], seqs[0] + 100))
    sock.close()
    await pub.close()


async def test_permessage_deflate_when_enabled(node_factory: Any) -> None:
    """With compression negotiated every socket gets its own compressed frames (no shared
    pre-framed bytes), and messages still arrive."""
    node = node_factory("deflate", RT_WS_DEFLATE="1")
    ch = chan()
    sub = await Raw.open(node.url, token("zip"), compression="deflate")
    pub = await Raw.open(node.url, token("zap"))
    assert sub.ws.response is not None
    assert "permessage-deflate" in sub.ws.response.headers.get("Sec-WebSocket-Extensions", "")
    await sub.ok("subscribe", channel=ch)
    for i in range(3):
        await pub.ok("publish", channel=ch, client_msg_id=f"z{i}", body=plain("a" * 2000))
    assert [(await sub.push())["seq"] for _ in range(3)] == [1, 2, 3]
    await sub.close()
    await pub.close()


# --- section 9 and operations ------------------------------------------------------------


async def test_server_api_publish_and_history(single_node: Node) -> None:
    bob = await Raw.open(single_node.url, token("bob"))
    await bob.ok("subscribe", channel="user:bob")
    r = single_node.api(
        "POST",
        "/v1/channels/user:bob/messages",
        json={"client_msg_id": "n1", "body": plain("you have mail")},
    )
    assert r.status_code == 201, r.text
    push = await bob.push()
    assert push["from"]["user"] == "@server" and push["body"]["text"] == "you have mail"
    r = single_node.api(
        "POST",
        "/v1/channels/user:bob/messages",
        json={"client_msg_id": "n1", "body": plain("again")},
    )
    assert r.status_code == 200 and r.json()["duplicate"] is True
    r = single_node.api("GET", "/v1/channels/user:bob/messages?limit=10")
    assert [m["body"]["text"] for m in r.json()["messages"]] == ["you have mail"]
    assert (
        single_node.api("POST", "/v1/channels/user:bob/messages", content=b"[").status_code == 400
    )
    assert (
        single_node.api(
            "POST", "/v1/channels/room:r/messages", json={"client_msg_id": "x", "body": plain("p")}
        ).status_code
        == 403
    )
    await bob.close()


def test_health_ready_metrics_openapi(single_node: Node) -> None:
    import httpx

    assert httpx.get(single_node.http + "/healthz").json()["status"] == "ok"
    ready = httpx.get(single_node.http + "/readyz")
    assert ready.status_code == 200 and ready.json()["store"] is True
    assert "rt_connections" in httpx.get(single_node.http + "/metrics").text
    spec = httpx.get(single_node.http + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/channels/{channel}/members/{user}" in spec["paths"]
    assert "/v1/twilio/status" in spec["paths"] and "/v1/alerts/{alert_id}" in spec["paths"]


async def test_sigterm_closes_sockets_1001_and_exits(node_factory) -> None:  # type: ignore[no-untyped-def]
    node = node_factory("graceful")
    raw = await Raw.open(node.url, token("alice"))
    node.kill(signal.SIGTERM)
    assert await raw.close_code() == 1001
    assert node.wait() == 0
