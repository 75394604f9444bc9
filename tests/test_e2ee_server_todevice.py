"""E2EE v2 on the server (docs/e2ee/server.md): to-device messages (`todevice.send`, `.fetch`,
`.ack`, the `todevice` push on `user:<id>`) and v2 envelopes on `publish` (verified with the
sender device's certified key, franking tag added). Devices are certified and published
through the wire (`keys.publish`); one real node, real clients."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import Node, RedisServer, running_node, shared_env, token
from v2_devices import Device, Person, uid
from wire import Raw, b64

from realtime_safety.crypto.envelope import OutboundSession, encrypt_v2

MAX_CT = 64 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from running_node(
        tmp_path_factory.mktemp("todevice"), "todevice", RT_RATE_PER_S="500", RT_RATE_BURST="500"
    )


@pytest.fixture
async def people(node: Node) -> AsyncIterator[tuple[Person, Person]]:
    alice, bob = Person.new("alice"), Person.new("bob")
    yield alice, bob
    await alice.close()
    await bob.close()


def msg(to: Device, ct: bytes | str = b"olm", kind: int = 0) -> dict[str, Any]:
    return {"user": to.user, "device": to.id, "type": kind, "ct": ct}


async def test_a_message_goes_from_one_device_to_another_and_is_gone_once_acknowledged(
    node: Node, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    a1, b1, b2 = await alice.device(node), await bob.device(node), await bob.device(node)
    await b1.raw.ok("subscribe", channel=f"user:{bob.user}")
    sent = await a1.raw.ok(
        "todevice.send", device=a1.id, messages=[msg(b1, b"first", 0), msg(b1, b"second", 1)]
    )
    assert sent["sent"] == 2
    push = await b1.raw.push()
    assert push == {"push": "todevice", "device": b1.id}

    got = (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"]
    assert [(m["from"], m["type"], m["ct"]) for m in got] == [
        ({"user": alice.user, "device": a1.id}, 0, b"first"),
        ({"user": alice.user, "device": a1.id}, 1, b"second"),
    ]
    assert all(isinstance(m["ts"], int) and isinstance(m["id"], str) for m in got)
    # another device of the same user has its own queue
    assert (await b2.raw.ok("todevice.fetch", device=b2.id))["messages"] == []
    # oldest first, `limit` at a time
    first = (await b1.raw.ok("todevice.fetch", device=b1.id, limit=1))["messages"]
    assert [m["ct"] for m in first] == [b"first"]

    assert (await b1.raw.ok("todevice.ack", device=b1.id, ids=[got[0]["id"]]))["deleted"] == 1
    left = (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"]
    assert [m["ct"] for m in left] == [b"second"]
    # acknowledged twice: nothing more to delete
    again = await b1.raw.ok("todevice.ack", device=b1.id, ids=[got[0]["id"], got[1]["id"]])
    assert again["deleted"] == 1
    assert (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"] == []


async def test_messages_come_out_in_the_order_they_were_sent(
    node: Node, people: tuple[Person, Person]
) -> None:
    """An Olm pre-key message must reach its device before the messages that follow it."""
    alice, bob = people
    a1, b1 = await alice.device(node), await bob.device(node)
    batch = [msg(b1, b"%d" % i) for i in range(50)]
    await a1.raw.ok("todevice.send", device=a1.id, messages=batch)
    await a1.raw.ok("todevice.send", device=a1.id, messages=[msg(b1, b"last")])
    got = (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"]
    assert [m["ct"] for m in got] == [m["ct"] for m in batch] + [b"last"]


async def test_a_json_client_sends_and_fetches_base64(
    node: Node, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    a1, b1 = await alice.device(node), await bob.device(node)
    a_json = await Raw.open(node.url, token(alice.user, device=a1.id))
    b_json = await Raw.open(node.url, token(bob.user, device=b1.id))
    try:
        await a_json.ok("todevice.send", device=a1.id, messages=[b64(msg(b1, b"\x00\xff"))])
        got = (await b_json.ok("todevice.fetch", device=b1.id))["messages"]
        assert [m["ct"] for m in got] == [b64(b"\x00\xff")]
        assert await a_json.error("todevice.send", device=a1.id, messages=[msg(b1, "no*b64")]) == (
            "bad_request"
        )
    finally:
        await a_json.close()
        await b_json.close()


async def test_the_sender_device_must_be_a_certified_device_of_the_caller(
    node: Node, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    a1, b1 = await alice.device(node), await bob.device(node)
    unpublished = await alice.device(node, publish=False)
    # control: her own device sends
    await a1.raw.ok("todevice.send", device=a1.id, messages=[msg(b1)])
    # bob's device, named by alice; a device never published; a revoked one
    assert await a1.raw.error("todevice.send", device=b1.id, messages=[msg(b1)]) == "forbidden"
    assert (
        await a1.raw.error("todevice.send", device=unpublished.id, messages=[msg(b1)])
        == "forbidden"
    )
    a2 = await alice.device(node)
    await a2.raw.ok("todevice.send", device=a2.id, messages=[msg(b1)])
    await alice.revoke(a2)
    assert await a2.raw.error("todevice.send", device=a2.id, messages=[msg(b1)]) == "forbidden"
    got = (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"]
    assert [m["from"]["device"] for m in got] == [a1.id, a2.id]


async def test_every_recipient_must_be_certified_and_unrevoked_or_nothing_is_sent(
    node: Node, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    a1, b1, b2 = await alice.device(node), await bob.device(node), await bob.device(node)
    ghost = await bob.device(node, publish=False)
    assert (
        await a1.raw.error("todevice.send", device=a1.id, messages=[msg(b1), msg(ghost)])
        == "not_found"
    )
    # a device id of bob's sent under alice's name is not alice's device
    wrong_user = {**msg(b1), "user": alice.user}
    assert await a1.raw.error("todevice.send", device=a1.id, messages=[wrong_user]) == ("not_found")
    await a1.raw.ok("todevice.send", device=a1.id, messages=[msg(b2)])
    await bob.revoke(b2)
    assert await a1.raw.error("todevice.send", device=a1.id, messages=[msg(b2)]) == "not_found"
    # the refused batch left nothing behind for the valid recipient
    assert (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"] == []


async def test_sizes_and_counts_are_limited(node: Node, people: tuple[Person, Person]) -> None:
    alice, bob = people
    a1, b1 = await alice.device(node), await bob.device(node)
    send = a1.raw
    assert await send.error("todevice.send", device=a1.id, messages=[msg(b1)] * 101) == (
        "bad_request"
    )
    assert await send.error("todevice.send", device=a1.id, messages=[]) == "bad_request"
    assert await send.error("todevice.send", device=a1.id, messages=[msg(b1, kind=2)]) == (
        "bad_request"
    )
    assert await send.error("todevice.send", device=a1.id, messages=[msg(b1, b"")]) == (
        "bad_request"
    )
    big = os.urandom(MAX_CT + 1)
    assert await send.error("todevice.send", device=a1.id, messages=[msg(b1, big)]) == ("too_large")
    await send.ok("todevice.send", device=a1.id, messages=[msg(b1, big[:MAX_CT])])
    for _ in range(9):
        await send.ok("todevice.send", device=a1.id, messages=[msg(b1)] * 100)
    await send.ok("todevice.send", device=a1.id, messages=[msg(b1)] * 99)  # 1000 waiting
    assert await send.error("todevice.send", device=a1.id, messages=[msg(b1)]) == "too_large"
    page = (await b1.raw.ok("todevice.fetch", device=b1.id, limit=100))["messages"]
    assert len(page) == 100 and len(page[0]["ct"]) == MAX_CT
    assert await b1.raw.error("todevice.fetch", device=b1.id, limit=101) == "bad_request"
    await b1.raw.ok("todevice.ack", device=b1.id, ids=[page[0]["id"]])
    await send.ok("todevice.send", device=a1.id, messages=[msg(b1)])  # room for one again
    assert await send.error("todevice.send", device=a1.id, messages=[msg(b1)]) == "too_large"


async def test_a_device_queue_is_its_owners_alone(
    node: Node, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    a1, b1 = await alice.device(node), await bob.device(node)
    await a1.raw.ok("todevice.send", device=a1.id, messages=[msg(b1)])
    got = (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"]
    ids = [m["id"] for m in got]
    # alice names bob's device: not hers
    assert await a1.raw.error("todevice.fetch", device=b1.id) == "forbidden"
    assert await a1.raw.error("todevice.ack", device=b1.id, ids=ids) == "forbidden"
    assert await a1.raw.error("todevice.ack", device=a1.id, ids=["../x"]) == "bad_request"
    # still there for bob
    assert [m["id"] for m in (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"]] == ids


# --- v2 envelopes on publish -------------------------------------------------------------------


async def room_of(node: Node, *people: Person) -> str:
    room = f"room:{uid('r')}"
    for p in people:
        node.add_member(room, p.user)
    return room


def envelope(dev: Device, room: str, cmid: str, text: str = "hi") -> dict[str, Any]:
    out = OutboundSession.new(room, epoch=1)
    return encrypt_v2(dev.account, out, room, dev.user, cmid, text)


async def test_a_v2_envelope_is_stored_with_a_franking_tag_and_the_verified_device(
    node: Node, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    a1, b1 = await alice.device(node), await bob.device(node)
    room = await room_of(node, alice, bob)
    await b1.raw.ok("subscribe", channel=room)
    body = envelope(a1, room, "m1")
    await a1.raw.ok("publish", channel=room, client_msg_id="m1", body=body)
    push = await b1.raw.push()
    assert push["push"] == "message"
    assert push["from"] == {"user": alice.user, "device": a1.id}
    stored = push["body"]
    assert {k: stored[k] for k in body} == body
    assert isinstance(stored["ftag"], bytes) and len(stored["ftag"]) == 32
    # a JSON client sends the same envelope in base64
    a_json = await Raw.open(node.url, token(alice.user, device=a1.id))
    try:
        await a_json.ok(
            "publish", channel=room, client_msg_id="m2", body=b64(envelope(a1, room, "m2"))
        )
    finally:
        await a_json.close()
    assert (await b1.raw.push())["client_msg_id"] == "m2"


async def test_a_v2_envelope_that_does_not_verify_is_refused(
    node: Node, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    a1, b1 = await alice.device(node), await bob.device(node)
    room = await room_of(node, alice, bob)

    async def refused(body: dict[str, Any], cmid: str, who: Device = a1) -> str:
        return await who.raw.error("publish", channel=room, client_msg_id=cmid, body=body)

    good = envelope(a1, room, "x1")
    await a1.raw.ok("publish", channel=room, client_msg_id="x1", body=good)  # control
    body = envelope(a1, room, "x2")
    assert await refused({**body, "sig": bytes(64)}, "x2") == "forbidden"
    assert await refused(body, "another-id") == "forbidden"  # signed for another cmid
    # bob passes alice's envelope off as his own: the signature names alice
    assert await refused(envelope(a1, room, "x3"), "x3", b1) == "forbidden"
    # alice claims bob's device
    assert await refused({**envelope(a1, room, "x4"), "device": b1.id}, "x4") == "forbidden"
    # a device never published
    ghost = await alice.device(node, publish=False)
    assert await refused(envelope(ghost, room, "x5"), "x5", ghost) == "forbidden"
    # a revoked device
    a2 = await alice.device(node)
    await a2.raw.ok("publish", channel=room, client_msg_id="x6", body=envelope(a2, room, "x6"))
    await alice.revoke(a2)
    assert await refused(envelope(a2, room, "x7"), "x7", a2) == "forbidden"
    # shape: a field too many, a field missing
    assert await refused({**envelope(a1, room, "x8"), "extra": 1}, "x8") == "bad_request"
    short = {k: v for k, v in envelope(a1, room, "x9").items() if k != "frank"}
    assert await refused(short, "x9") == "bad_request"


async def test_a_message_sent_through_one_node_is_announced_and_fetched_on_another(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> None:
    env = shared_env(redis_server, mongo_uri)
    na: Node = node_factory("a", RT_NODE_ID="node-a", **env)
    nb: Node = node_factory("b", RT_NODE_ID="node-b", **env)
    alice, bob = Person.new("alice"), Person.new("bob")
    try:
        a1, b1 = await alice.device(na), await bob.device(nb)
        await b1.raw.ok("subscribe", channel=f"user:{bob.user}")
        batch = [msg(b1, b"%d" % i) for i in range(5)]
        await a1.raw.ok("todevice.send", device=a1.id, messages=batch)
        assert await b1.raw.push() == {"push": "todevice", "device": b1.id}
        got = (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"]
        assert [m["ct"] for m in got] == [m["ct"] for m in batch]
        ids = [m["id"] for m in got]
        assert (await b1.raw.ok("todevice.ack", device=b1.id, ids=ids))["deleted"] == 5
        assert (await b1.raw.ok("todevice.fetch", device=b1.id))["messages"] == []
    finally:
        await alice.close()
        await bob.close()
