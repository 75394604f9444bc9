"""Moderation (docs/protocol-v1.md section 8) with real server processes on two nodes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from conftest import Node, RedisServer, shared_env, token
from wire import AppDevice, Raw, plain, until

MOD_OPS: list[tuple[str, dict[str, Any]]] = [
    ("mod.watch", {"pattern": "room:*"}),
    ("mod.unwatch", {"pattern": "room:*"}),
    ("mod.delete", {"channel": "public:x", "seq": 1, "reason": "r"}),
    ("mod.ban", {"user": "bob", "reason": "r"}),
    ("mod.unban", {"user": "bob"}),
    ("mod.reports", {}),
    ("mod.resolve_report", {"report_id": "x", "state": "dismissed"}),
    ("mod.audit", {}),
    ("mod.alerts", {}),
]


async def test_every_moderator_op_is_forbidden_to_others(single_node: Node) -> None:
    user = await Raw.open(single_node.url, token("plain-user", roles=["user", "responder"]))
    for op, args in MOD_OPS:
        reply = await user.cmd(op, **args)
        assert reply["error"]["code"] == "forbidden", op
    await user.close()


@pytest.fixture
def two(node_factory: Any, redis_server: RedisServer, mongo_uri: str) -> tuple[Node, Node]:
    env = shared_env(redis_server, mongo_uri)
    return node_factory("a", RT_NODE_ID="a", **env), node_factory("b", RT_NODE_ID="b", **env)


async def test_watch_delete_and_ban_across_nodes(two: tuple[Node, Node]) -> None:
    a, b = two
    room = f"room:{uuid.uuid4().hex[:6]}"
    for u in ("alice", "bob"):
        a.add_member(room, u)
    mod = await Raw.open(a.url, token("mia", roles=["user", "moderator"]))
    await mod.ok("mod.watch", pattern="room:*")
    alice = await Raw.open(b.url, token("alice"))
    bob = await Raw.open(b.url, token("bob"))
    await bob.ok("subscribe", channel=room)

    # watching: room messages published on node b reach the moderator on node a
    phone = AppDevice(f"alice-{uuid.uuid4().hex[:6]}")
    await phone.register(alice, "alice")
    seq = (
        await alice.ok("publish", channel=room, client_msg_id="m1", body=phone.envelope(room, "m1"))
    )["seq"]
    watched = await mod.push(5)
    assert (watched["push"], watched["channel"], watched["seq"]) == ("message", room, seq)
    # not matched by room:*: proved below, where the watcher's next push is the deletion
    await alice.ok("publish", channel="public:elsewhere", client_msg_id="p1", body=plain("x"))
    members = await bob.ok("presence", channel=room)
    assert "mia" not in [m["user"] for m in members["members"]]  # watchers are invisible
    assert (await bob.push(5))["seq"] == seq

    # delete on node a: the subscriber on node b and the watcher both see it go
    await mod.ok("mod.delete", channel=room, seq=seq, reason="abuse")
    assert await bob.push(5) == {"push": "deleted", "channel": room, "seq": seq}
    # (published to the moderation stream after public:elsewhere's message, so that one
    # would have come first had it matched)
    assert await mod.push(5) == {"push": "deleted", "channel": room, "seq": seq}
    stored = (await bob.ok("history", channel=room))["messages"][0]
    assert stored["body"]["alg"] == "deleted" and "ct" not in stored["body"]
    assert await mod.error("mod.delete", channel=room, seq=99, reason="x") == "not_found"

    # a channel ban: kicked everywhere at once, refused afterwards
    await mod.ok("mod.ban", user="bob", channel=room, reason="spam", duration_s=600)
    assert await bob.push(5) == {"push": "kicked", "channel": room, "reason": "banned"}
    assert await bob.error("subscribe", channel=room) == "forbidden"
    assert (
        await bob.error("publish", channel=room, client_msg_id="z", body=phone.envelope(room, "z"))
        == "forbidden"
    )
    await bob.ok("subscribe", channel="public:elsewhere")  # only that channel
    await mod.ok("mod.unban", user="bob", channel=room)

    async def subscribed() -> bool:  # node b hears of the unban through a control event
        reply = await bob.cmd("subscribe", channel=room)
        assert reply["ok"] or reply["error"]["code"] == "forbidden", reply
        return bool(reply["ok"])

    await until(subscribed, 10, what="node b to lift the channel ban")

    # a global ban: closed 4009 on node b, and back in through node a for alert ops only
    await mod.ok("mod.ban", user="bob", reason="harassment")
    assert await bob.close_code(10) == 4009
    again = await Raw.open(a.url)
    reply = await again.cmd("auth", token=token("bob"))
    assert reply["ok"] and reply["banned"] == "harassment", reply
    assert await again.error("subscribe", channel="public:elsewhere") == "forbidden"

    # everything above is in the audit log
    audit = (
        await asyncio.to_thread(
            httpx.get, f"{a.http}/v1/audit", headers={"Authorization": f"Bearer {_key()}"}
        )
    ).json()
    actions = [(e["actor"], e["action"]) for e in audit["entries"]]
    assert actions == [("mia", "delete"), ("mia", "ban"), ("mia", "unban"), ("mia", "ban")]
    assert (await mod.ok("mod.audit"))["entries"][-1]["user"] == "bob"
    for r in (mod, alice):
        await r.close()


def _key() -> str:
    from conftest import API_KEY

    return API_KEY


async def test_reports_queue(single_node: Node) -> None:
    room = f"room:{uuid.uuid4().hex[:6]}"
    single_node.add_member(room, "rex")
    single_node.add_member(room, "sam")
    rex = await Raw.open(single_node.url, token("rex"))
    await rex.ok("publish", channel="public:r", client_msg_id="a", body=plain("spam spam"))
    reply = await rex.ok("report", channel="public:r", seq=1, reason="spam")
    assert reply["verified"] is False
    assert await rex.error("report", channel="public:r", seq=99, reason="x") == "not_found"
    mod = await Raw.open(single_node.url, token("mo", roles=["user", "moderator"]))
    reports = (await mod.ok("mod.reports"))["reports"]
    mine = [r for r in reports if r["id"] == reply["report_id"]]
    assert mine and mine[0]["channel"] == "public:r" and mine[0]["reporter"] == "rex"
    await mod.ok("mod.resolve_report", report_id=reply["report_id"], state="dismissed")
    assert (
        await mod.error("mod.resolve_report", report_id=reply["report_id"], state="actioned")
        == "not_found"
    )
    dismissed = (await mod.ok("mod.reports", state="dismissed"))["reports"]
    assert reply["report_id"] in [r["id"] for r in dismissed]
    for r in (rex, mod):
        await r.close()
