"""The signed membership log on the server (docs/e2ee/server.md, "Membership log"):
`members.log.append` checks every entry as members will before storing it (one per epoch,
whoever races), mirrors it into the server's memberships with the usual pushes, and
`members.log.fetch` hands the log back. One real node, real clients; devices certified and
published through the wire (`keys.publish`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
from conftest import Node, RedisServer, running_node, shared_env, token
from v2_devices import Device, Person, now_ms, uid
from wire import Raw, b64

from realtime_safety.crypto.membership import MemberEntry, entry_statement
from realtime_safety.crypto.membership_state import MembershipState


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from running_node(
        tmp_path_factory.mktemp("mlog"), "mlog", RT_RATE_PER_S="500", RT_RATE_BURST="500"
    )


class Log:
    """A room's log as a client keeps it: entries are signed on it and applied once the
    server took them."""

    def __init__(self, room: str) -> None:
        self.room = room
        self.state = MembershipState(room)
        self.keys: dict[tuple[str, str], bytes] = {}

    def entry(
        self,
        dev: Device,
        op: str,
        target: str,
        role: str = "member",
        *,
        epoch: int | None = None,
        prev: bytes | None = None,
        actor: str | None = None,
    ) -> MemberEntry:
        fields = (
            self.room,
            self.state.epoch + 1 if epoch is None else epoch,
            self.state.head if prev is None else prev,
            op,
            target,
            "" if op in ("remove", "leave") else role,
            dev.user if actor is None else actor,
            dev.id,
            now_ms(),
        )
        return MemberEntry(*fields, dev.account.sign(entry_statement(*fields)))

    def taken(self, entry: MemberEntry, dev: Device) -> None:
        self.keys[dev.user, dev.id] = dev.account.ed25519
        assert self.state.apply(entry, lambda u, d: self.keys.get((u, d)))

    async def append(self, dev: Device, entry: MemberEntry) -> dict[str, Any]:
        reply = await dev.raw.ok("members.log.append", channel=self.room, entry=entry.to_wire())
        self.taken(entry, dev)
        assert reply["epoch"] == self.state.epoch and reply["head"] == self.state.head
        return reply

    async def refused(self, dev: Device, entry: MemberEntry) -> str:
        return await dev.raw.error("members.log.append", channel=self.room, entry=entry.to_wire())


Cast = tuple[Log, Person, Device, Person, Person]


@pytest.fixture
async def cast(node: Node) -> AsyncIterator[Cast]:
    """A room whose server membership has alice; her log created by her device a1; bob and
    carol not members yet."""
    alice, bob, carol = Person.new("alice"), Person.new("bob"), Person.new("carol")
    log = Log(f"room:{uid('r')}")
    node.add_member(log.room, alice.user)
    a1 = await alice.device(node)
    await log.append(a1, log.entry(a1, "create", alice.user, "owner"))
    yield log, alice, a1, bob, carol
    for p in (alice, bob, carol):
        await p.close()


def members(node: Node, room: str) -> list[str]:
    r = node.api("GET", f"/v1/channels/{room}/members")
    assert r.status_code == 200, r.text
    names: list[str] = r.json()["members"]
    return names


async def test_create_needs_a_member_of_the_room_as_the_server_knows_it(node: Node) -> None:
    alice, dave = Person.new("alice"), Person.new("dave")
    room = f"room:{uid('r')}"
    node.add_member(room, alice.user)
    a1, d1 = await alice.device(node), await dave.device(node)
    log = Log(room)
    assert await log.refused(d1, log.entry(d1, "create", dave.user, "owner")) == "forbidden"
    await log.append(a1, log.entry(a1, "create", alice.user, "owner"))  # control
    got = await a1.raw.ok("members.log.fetch", channel=room)
    assert got["epoch"] == 1
    assert [MemberEntry.from_wire(e) for e in got["entries"]] == list(log.state.entries)
    assert await d1.raw.error("members.log.fetch", channel=room) == "forbidden"
    assert await a1.raw.error("members.log.fetch", channel="public:x") == "bad_request"
    await alice.close()
    await dave.close()


async def test_add_and_remove_are_mirrored_into_the_memberships_with_their_pushes(
    node: Node, cast: Cast
) -> None:
    log, _, a1, bob, _ = cast
    await a1.raw.ok("subscribe", channel=log.room)
    b1 = await bob.device(node)
    assert await b1.raw.error("subscribe", channel=log.room) == "forbidden"

    await log.append(a1, log.entry(a1, "add", bob.user))
    assert (await a1.raw.push()) == {"push": "members.log", "channel": log.room, "epoch": 2}
    assert bob.user in members(node, log.room)
    await b1.raw.ok("subscribe", channel=log.room)  # a member now
    got = await b1.raw.ok("members.log.fetch", channel=log.room, after=1)
    assert got["epoch"] == 2
    assert [MemberEntry.from_wire(e) for e in got["entries"]] == [log.state.entries[1]]

    await log.append(a1, log.entry(a1, "remove", bob.user))
    assert (await a1.raw.push()) == {"push": "members.log", "channel": log.room, "epoch": 3}
    assert (await a1.raw.push()) == {"push": "rekey", "channel": log.room}
    # bob hears of his removal in the log, then loses the subscription
    assert (await b1.raw.push())["push"] == "members.log"
    kicked = await b1.raw.push()
    assert kicked["push"] == "unsubscribed" and kicked["reason"] == "removed"
    assert bob.user not in members(node, log.room)
    assert await b1.raw.error("subscribe", channel=log.room) == "forbidden"


async def test_a_member_who_leaves_is_no_member(node: Node, cast: Cast) -> None:
    log, _, a1, bob, _ = cast
    b1 = await bob.device(node)
    await log.append(a1, log.entry(a1, "add", bob.user))
    await log.append(b1, log.entry(b1, "leave", bob.user))
    assert bob.user not in members(node, log.room)


async def test_a_plain_member_may_not_add(node: Node, cast: Cast) -> None:
    log, _, a1, bob, carol = cast
    b1 = await bob.device(node)
    await log.append(a1, log.entry(a1, "add", bob.user))
    assert await log.refused(b1, log.entry(b1, "add", carol.user)) == "forbidden"
    assert carol.user not in members(node, log.room)
    await log.append(a1, log.entry(a1, "role", bob.user, "admin"))
    await log.append(b1, log.entry(b1, "add", carol.user))  # an admin may
    assert carol.user in members(node, log.room)


async def test_an_entry_off_the_head_is_a_conflict(node: Node, cast: Cast) -> None:
    log, _, a1, bob, carol = cast
    assert await log.refused(a1, log.entry(a1, "add", bob.user, prev=bytes(32))) == "conflict"
    assert await log.refused(a1, log.entry(a1, "add", bob.user, epoch=3)) == "conflict"
    take = log.entry(a1, "add", bob.user)
    await log.append(a1, take)
    # another entry for the epoch just taken, on the same link: a conflict too
    rival = log.entry(a1, "add", carol.user, epoch=2, prev=log.state.hash_at(1))
    assert await log.refused(a1, rival) == "conflict"
    assert carol.user not in members(node, log.room)
    # the same entry again is the same answer (a retry)
    again = await a1.raw.ok("members.log.append", channel=log.room, entry=take.to_wire())
    assert (again["epoch"], again["head"]) == (2, log.state.head)
    assert (await a1.raw.ok("members.log.fetch", channel=log.room))["epoch"] == 2


async def test_signature_actor_and_device_are_checked(node: Node, cast: Cast) -> None:
    log, alice, a1, bob, _ = cast
    b1 = await bob.device(node)
    good = log.entry(a1, "add", bob.user)
    assert await log.refused(a1, replace(good, sig=bytes(64))) == "forbidden"
    assert await log.refused(a1, replace(good, target_user="mallory")) == "forbidden"
    # alice's valid entry sent by bob: the caller is not the actor
    assert await log.refused(b1, good) == "forbidden"
    # a device of alice's never published
    ghost = await alice.device(node, publish=False)
    assert await log.refused(ghost, log.entry(ghost, "add", bob.user)) == "forbidden"
    # malformed: not the entry's fields; an entry for another room
    assert await a1.raw.error("members.log.append", channel=log.room, entry={"op": "add"}) == (
        "bad_request"
    )
    elsewhere = {**good.to_wire(), "channel": f"room:{uid('other')}"}
    assert await a1.raw.error("members.log.append", channel=log.room, entry=elsewhere) == (
        "bad_request"
    )
    await log.append(a1, good)  # control: the untouched entry is taken
    # a revoked device: taken before, refused after
    a2 = await alice.device(node)
    await log.append(a2, log.entry(a2, "role", bob.user, "admin"))
    await alice.revoke(a2)
    assert await log.refused(a2, log.entry(a2, "role", bob.user, "member")) == "forbidden"
    # the log still loads with the revoked device's earlier entry in it
    await log.append(a1, log.entry(a1, "role", bob.user, "member"))


async def test_two_entries_racing_for_one_epoch_one_wins(node: Node, cast: Cast) -> None:
    log, alice, a1, bob, carol = cast
    a2 = await alice.device(node)
    one, two = log.entry(a1, "add", bob.user), log.entry(a2, "add", carol.user)
    replies = await asyncio.gather(
        a1.raw.cmd("members.log.append", channel=log.room, entry=one.to_wire()),
        a2.raw.cmd("members.log.append", channel=log.room, entry=two.to_wire()),
    )
    oks = [r["ok"] for r in replies]
    assert sorted(oks) == [False, True], replies
    loser = replies[oks.index(False)]
    assert loser["error"]["code"] == "conflict"
    winner, dev = (one, a1) if oks[0] else (two, a2)
    log.taken(winner, dev)
    got = await a1.raw.ok("members.log.fetch", channel=log.room)
    assert [MemberEntry.from_wire(e) for e in got["entries"]] == list(log.state.entries)
    assert {bob.user, carol.user} & set(members(node, log.room)) == {winner.target_user}


async def test_a_json_client_sends_the_entry_in_base64(node: Node, cast: Cast) -> None:
    log, alice, a1, bob, _ = cast
    raw = await Raw.open(node.url, token(alice.user, device=a1.id))
    try:
        entry = log.entry(a1, "add", bob.user)
        got = await raw.ok("members.log.append", channel=log.room, entry=b64(entry.to_wire()))
        log.taken(entry, a1)
        assert got["head"] == b64(log.state.head)
        fetched = await raw.ok("members.log.fetch", channel=log.room)
        assert fetched["entries"][-1] == b64(entry.to_wire())
    finally:
        await raw.close()


async def test_a_restarted_node_verifies_the_stored_log_again_revoked_devices_included(
    node_factory: Any,
) -> None:
    """The log is checked again from the store after a restart (no state held): an entry made
    by a device revoked since still counts, and the next entry links to it."""
    fresh: Node = node_factory("restart", RT_RATE_PER_S="500", RT_RATE_BURST="500")
    alice, bob = Person.new("alice"), Person.new("bob")
    log = Log(f"room:{uid('r')}")
    fresh.add_member(log.room, alice.user)
    a1, a2 = await alice.device(fresh), await alice.device(fresh)
    await log.append(a1, log.entry(a1, "create", alice.user, "owner"))
    await log.append(a2, log.entry(a2, "add", bob.user))
    await alice.revoke(a2)
    await alice.close()
    fresh.stop()
    fresh.start()
    raw = await alice.connect(fresh, a1.id)
    try:
        a1 = Device(alice.user, a1.account, raw)
        assert await log.refused(a1, log.entry(a1, "add", bob.user, prev=bytes(32))) == ("conflict")
        await log.append(a1, log.entry(a1, "remove", bob.user))
        assert bob.user not in members(fresh, log.room)
        got = await raw.ok("members.log.fetch", channel=log.room)
        assert [MemberEntry.from_wire(e) for e in got["entries"]] == list(log.state.entries)
    finally:
        await raw.close()


async def test_two_nodes_sharing_a_store_keep_one_log(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> None:
    """Entries racing for one epoch through two nodes (MongoDB, Redis): one wins; each node's
    verified state follows what the other stored; pushes cross nodes."""
    env = shared_env(redis_server, mongo_uri)
    na: Node = node_factory("a", RT_NODE_ID="node-a", **env)
    nb: Node = node_factory("b", RT_NODE_ID="node-b", **env)
    alice, bob, carol = Person.new("alice"), Person.new("bob"), Person.new("carol")
    log = Log(f"room:{uid('r')}")
    na.add_member(log.room, alice.user)
    a1, a2 = await alice.device(na), await alice.device(nb)
    try:
        await log.append(a1, log.entry(a1, "create", alice.user, "owner"))
        await a2.raw.ok("members.log.fetch", channel=log.room)  # node b holds epoch 1
        for _ in range(3):
            one, two = log.entry(a1, "add", bob.user), log.entry(a2, "add", carol.user)
            replies = await asyncio.gather(
                a1.raw.cmd("members.log.append", channel=log.room, entry=one.to_wire()),
                a2.raw.cmd("members.log.append", channel=log.room, entry=two.to_wire()),
            )
            oks = [r["ok"] for r in replies]
            assert sorted(oks) == [False, True], replies
            assert replies[oks.index(False)]["error"]["code"] == "conflict"
            winner, dev = (one, a1) if oks[0] else (two, a2)
            log.taken(winner, dev)
            await a2.raw.ok("subscribe", channel=log.room)
            # the loser's node goes on from the winner's entry
            loser = a2 if dev is a1 else a1
            await log.append(loser, log.entry(loser, "remove", winner.target_user))
            assert (await a2.raw.push())["push"] == "members.log"
            assert (await a2.raw.push())["push"] == "rekey"
            await a2.raw.ok("unsubscribe", channel=log.room)
        for raw in (a1.raw, a2.raw):
            got = await raw.ok("members.log.fetch", channel=log.room)
            assert [MemberEntry.from_wire(e) for e in got["entries"]] == list(log.state.entries)
    finally:
        await alice.close()
