"""A channel ban is a ban (issue 23, hole 2): every op in the channel is refused to the banned
member, she leaves the member list others see, and the members left are told to rekey. Each
refusal has its control beside it: the same op by a member who is not banned succeeds (and
succeeded for her before the ban)."""

from __future__ import annotations

import os
import uuid
from typing import Any

from conftest import Node, token
from wire import AppDevice, Raw, b64


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def sealed(*devices: tuple[str, str]) -> dict[str, Any]:
    """`keys.share`'s sealed map for (user, device) pairs (random boxes: the server cannot
    tell)."""
    out: dict[str, dict[str, bytes]] = {}
    for user, device in devices:
        out.setdefault(user, {})[device] = os.urandom(80)
    return b64(out)


async def every_op(raw: Raw, room: str, seq: int, device: str) -> dict[str, str | None]:
    """Each op in the room: None when allowed, else its error code."""
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("history", {"channel": room}),
        ("read", {"channel": room, "seq": seq}),
        ("members", {"channel": room}),
        ("presence", {"channel": room}),
        ("report", {"channel": room, "seq": seq, "reason": "spam"}),
        ("keys.fetch", {"channel": room, "key_id": "k1", "device": device}),
        ("typing", {"channel": room}),
    ]
    out: dict[str, str | None] = {}
    for op, args in attempts:
        reply = await raw.cmd(op, **args)
        out[op] = None if reply["ok"] else reply["error"]["code"]
    return out


async def test_a_banned_member_loses_every_op_and_her_place_in_the_room(
    single_node: Node,
) -> None:
    url = single_node.url
    mia, alice, bob, carl = uid("mia"), uid("alice"), uid("bob"), uid("carl")
    room = f"room:{uid('r')}"
    for member in (alice, bob, carl):
        single_node.add_member(room, member)
    mod = await Raw.open(url, token(mia, roles=["user", "moderator"]))
    raws = {u: await Raw.open(url, token(u)) for u in (alice, bob, carl)}
    devices = {u: AppDevice(uid(u)) for u in raws}
    for u, raw in raws.items():
        await devices[u].register(raw, u)
    dev = {u: d.keys.device for u, d in devices.items()}
    ref = {u: (u, d) for u, d in dev.items()}
    a, b = raws[alice], raws[bob]
    await a.ok("subscribe", channel=room)
    await b.ok("subscribe", channel=room)
    await a.ok("keys.share", channel=room, key_id="k1", sealed=sealed(*ref.values()))
    seq = (
        await a.ok(
            "publish", channel=room, client_msg_id="m1", body=devices[alice].envelope(room, "m1")
        )
    )["seq"]
    assert (await b.push(5))["seq"] == (await a.push(5))["seq"] == seq

    # before the ban: bob may do everything (the control for each refusal below)
    assert set((await every_op(b, room, seq, dev[bob])).values()) == {None}
    assert (await a.push(5))["push"] == "typing"  # bob's, above
    members = (await a.ok("members", channel=room))["members"]
    assert sorted(members) == sorted([alice, bob, carl])

    await mod.ok("mod.ban", user=bob, channel=room, reason="abuse")
    assert await b.push(5) == {"push": "kicked", "channel": room, "reason": "banned"}
    assert await a.push(5) == {"push": "rekey", "channel": room}  # the honest rotate

    # after: a message she must not read, and a key shared with the others
    later = (
        await a.ok(
            "publish", channel=room, client_msg_id="m2", body=devices[alice].envelope(room, "m2")
        )
    )["seq"]
    await a.ok("keys.share", channel=room, key_id="k2", sealed=sealed(ref[alice], ref[carl]))
    refused = await every_op(b, room, later, dev[bob])
    assert refused == dict.fromkeys(refused, "forbidden"), refused
    reply = await b.cmd("keys.fetch", channel=room, device=dev[bob])  # the newest key
    assert reply["error"]["code"] == "forbidden", reply
    assert await b.error("subscribe", channel=room) == "forbidden"
    # carl, not banned, does all of it (typing is rate limited per user: once here)
    allowed = await every_op(raws[carl], room, later, dev[carl])
    assert set(allowed.values()) == {None}, allowed
    fetched = await raws[carl].ok("keys.fetch", channel=room, device=dev[carl])
    assert fetched["key_id"] == "k2"

    # she is gone from the list others see, and no key can be shared with her devices
    members = (await a.ok("members", channel=room))["members"]
    assert sorted(members) == sorted([alice, carl])
    reply = await a.cmd("keys.share", channel=room, key_id="k3", sealed=sealed(ref[bob]))
    assert reply["error"]["code"] == "forbidden", reply
    await a.ok("keys.share", channel=room, key_id="k3", sealed=sealed(ref[carl]))

    # unbanned, she is a member again (the ban, not the test, was what refused her)
    await mod.ok("mod.unban", user=bob, channel=room)
    assert (await b.ok("history", channel=room))["messages"][-1]["seq"] == later
    assert sorted((await a.ok("members", channel=room))["members"]) == sorted([alice, bob, carl])

    # a removal ends the same ops
    r = single_node.api("DELETE", f"/v1/channels/{room}/members/{carl}")
    assert r.status_code in (200, 204), r.text
    removed = await every_op(raws[carl], room, later, dev[carl])
    assert removed == dict.fromkeys(removed, "forbidden"), removed
    for raw in (mod, *raws.values()):
        await raw.close()


async def test_a_ban_from_a_public_channel_ends_history_and_presence_there(
    single_node: Node,
) -> None:
    url = single_node.url
    mia, ann, ben = uid("mia"), uid("ann"), uid("ben")
    channel = f"public:{uid('p')}"
    mod = await Raw.open(url, token(mia, roles=["user", "moderator"]))
    ann_ws, ben_ws = await Raw.open(url, token(ann)), await Raw.open(url, token(ben))
    await ann_ws.ok(
        "publish", channel=channel, client_msg_id="x", body={"v": 1, "alg": "none", "text": "x"}
    )
    for op in ("history", "presence"):
        await ben_ws.ok(op, channel=channel)
    await mod.ok("mod.ban", user=ben, channel=channel, reason="abuse")
    for op in ("history", "presence"):
        assert await ben_ws.error(op, channel=channel) == "forbidden", op
        await ann_ws.ok(op, channel=channel)
    assert await ben_ws.error("read", channel=channel, seq=1) == "forbidden"
    await ann_ws.ok("read", channel=channel, seq=1)
    for raw in (mod, ann_ws, ben_ws):
        await raw.close()
