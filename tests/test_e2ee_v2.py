"""E2EE v2 end to end through a real server (docs/e2ee/): the client library with the
directory, to-device and membership-log ops. The attacks are in tests/test_hostile_server.py;
these are the honest stories each of them must keep working."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from conftest import Node, running_node, token
from v2_devices import next_message, read_until

from realtime_safety.crypto.client_v2 import SecureClient
from realtime_safety.crypto.e2ee import CryptoError
from realtime_safety.crypto.envelope import DeviceAccount
from realtime_safety.crypto.user_keys import UserKeys


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from running_node(tmp_path_factory.mktemp("e2ee-v2"), "e2ee-v2")


class People:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.keys: dict[str, UserKeys] = {}
        self.open: list[SecureClient] = []

    async def device(self, name: str) -> SecureClient:
        """A new device of `name` (the user key made on the first one, shared by the rest)."""
        user = self.keys[name].user if name in self.keys else f"{name}-{uuid.uuid4().hex[:6]}"
        keys = self.keys.setdefault(name, UserKeys.generate(user))
        account = DeviceAccount.generate()
        chat = SecureClient(self.node.url, token(user, device=account.device), user, account, keys)
        await chat.start()
        self.open.append(chat)
        return chat

    async def room(self, owner: SecureClient, *others: SecureClient) -> str:
        channel = f"room:{uuid.uuid4().hex[:10]}"
        for user in dict.fromkeys([owner.user, *(o.user for o in others)]):
            self.node.add_member(channel, user)
        await owner.create_room(channel)
        for user in dict.fromkeys(o.user for o in others if o.user != owner.user):
            await owner.add_member(channel, user)
        for chat in (owner, *others):
            await chat.subscribe(channel)
        return channel


@pytest.fixture
async def people(node: Node) -> AsyncIterator[People]:
    p = People(node)
    yield p
    for chat in p.open:
        await chat.client.close()


async def test_two_users_exchange_verified_messages(people: People) -> None:
    alice, bob = await people.device("alice"), await people.device("bob")
    ch = await people.room(alice, bob)
    await alice.send(ch, "meet at noon")
    got = await next_message(bob)
    assert (got.text, got.user, got.error, got.verified) == ("meet at noon", alice.user, None, True)
    assert got.device == alice.device
    await bob.send(ch, "ok!")
    mine = await next_message(alice)  # her own message comes back, readable
    assert (mine.text, mine.verified) == ("meet at noon", True)
    reply = await next_message(alice)
    assert (reply.text, reply.user, reply.verified) == ("ok!", bob.user, True)
    assert alice.events == [] and bob.events == []
    assert alice.safety_number(bob.user) == bob.safety_number(alice.user) is not None


async def test_a_removed_member_reads_nothing_sent_after(people: People) -> None:
    alice, bob, carol = [await people.device(n) for n in ("alice", "bob", "carol")]
    ch = await people.room(alice, bob, carol)
    await alice.send(ch, "before")
    assert (await next_message(carol)).text == "before"
    assert (await next_message(bob)).text == "before"
    people.node.api("DELETE", f"/v1/channels/{ch}/members/{carol.user}")
    await alice.remove_member(ch, carol.user)
    await alice.send(ch, "after")
    got = await read_until(bob, "after")
    assert got[-1].verified
    # carol kept the old session; the new one never reached her devices
    push = {"push": "message", "channel": ch, "seq": 2, "from": {"user": alice.user}}
    history = await alice.client.request("history", channel=ch, since_seq=1)
    item = history["messages"][-1]
    opened = await carol.open({**push, **item, "body": item["body"]})
    assert opened.text is None and opened.error is not None


async def test_a_new_device_reads_what_is_sent_after_it_joins(people: People) -> None:
    alice, bob = await people.device("alice"), await people.device("bob")
    ch = await people.room(alice, bob)
    await alice.send(ch, "one")
    assert (await next_message(bob)).text == "one"
    bob2 = await people.device("bob")  # certified by bob's user key
    await bob2.subscribe(ch)
    await alice.send(ch, "two")
    got = await read_until(bob2, "two")
    assert got[-1].verified and got[-1].user == alice.user
    assert bob2.events == []


async def test_a_member_the_signed_log_does_not_name_gets_no_key(people: People) -> None:
    alice, bob = await people.device("alice"), await people.device("bob")
    mallory = await people.device("mallory")
    ch = await people.room(alice, bob)
    people.node.add_member(ch, mallory.user)  # the server says so; no owner signed it
    await mallory.subscribe(ch)
    await alice.send(ch, "secret")
    assert (await next_message(bob)).text == "secret"
    got = await next_message(mallory)
    assert got.text is None and got.error is not None
    assert {"kind": "member_not_in_signed_log", "channel": ch, "user": mallory.user} in alice.events


async def test_a_report_of_a_v2_message_is_verified(people: People) -> None:
    alice, bob = await people.device("alice"), await people.device("bob")
    ch = await people.room(alice, bob)
    await alice.send(ch, "you are awful")
    got = await next_message(bob)
    report = await bob.report(got, "abuse")
    assert report["verified"] is True


async def test_a_device_linked_by_two_codes_reads_and_sends_without_the_user_key(
    people: People,
) -> None:
    """Adding a device from a trusted one (crypto/device_link.py): the phone holding the user
    key approves the tablet's answer; the tablet never holds the user key, finds its
    certificate in the log, reads and sends verified messages."""
    from realtime_safety.crypto.device_link import answer, offer

    alice, bob = await people.device("alice"), await people.device("bob")
    ch = await people.room(alice, bob)
    tablet_account = DeviceAccount.generate()
    code = answer(offer(people.keys["bob"]), tablet_account.olm_account, tablet_account.device)
    early = SecureClient(
        people.node.url, token(bob.user, device=tablet_account.device), bob.user,
        tablet_account, None,
    )  # fmt: skip
    with pytest.raises(CryptoError, match="not certified yet"):
        await early.start()  # before the phone approved it
    await early.client.close()
    await bob.approve_device(code)
    tablet = SecureClient(
        people.node.url, token(bob.user, device=tablet_account.device), bob.user,
        tablet_account, None,
    )  # fmt: skip
    await tablet.start()
    people.open.append(tablet)
    await tablet.subscribe(ch)
    await alice.send(ch, "hello tablet")
    got = await read_until(tablet, "hello tablet")
    assert got[-1].verified and got[-1].user == alice.user
    await tablet.send(ch, "from the tablet")
    reply = await read_until(alice, "from the tablet")
    assert reply[-1].verified and reply[-1].device == tablet_account.device
    assert tablet.safety_number(alice.user) == alice.safety_number(bob.user)
    assert tablet.events == [] and alice.events == []


async def test_a_v2_client_with_its_v1_keys_reads_v1_envelopes_unverified(
    people: People,
) -> None:
    """v1 envelopes stay readable: a v2 client given its device's v1 keys (`legacy`) reads
    what a v1 client sends, marked unverified (its keys came from a directory the server
    controls); without them it refuses the envelope."""
    from realtime_safety.crypto.client import SecureClient as V1Client
    from realtime_safety.crypto.e2ee import DeviceKeys

    bob_keys = UserKeys.generate(f"bob-{uuid.uuid4().hex[:6]}")
    account, legacy = DeviceAccount.generate(), DeviceKeys.generate()
    bob = SecureClient(
        people.node.url, token(bob_keys.user, device=account.device), bob_keys.user,
        account, bob_keys, legacy=legacy,
    )  # fmt: skip
    await bob.start()
    people.open.append(bob)
    alice_user = f"alice-{uuid.uuid4().hex[:6]}"
    alice = V1Client(people.node.url, token(alice_user), alice_user, DeviceKeys.generate())
    await alice.start()
    ch = f"room:{uuid.uuid4().hex[:10]}"
    for user in (alice_user, bob.user):
        people.node.add_member(ch, user)
    await bob.subscribe(ch)
    await alice.send(ch, "from the old app")
    got = await next_message(bob)
    assert (got.text, got.user, got.verified, got.error) == (
        "from the old app", alice_user, False, None,
    )  # fmt: skip
    push = {"push": "message", "channel": ch, "seq": got.seq, "from": {"user": alice_user}}
    history = await bob.client.request("history", channel=ch, since_seq=0)
    item = history["messages"][0]
    without = await people.device("carl")  # the same envelope, to a v2 client without v1 keys
    refused = await without.open({**push, **item})
    assert refused.text is None and refused.error is not None
    await alice.client.close()


async def test_a_key_published_for_me_that_i_did_not_make_is_seen(people: People) -> None:
    """Owner monitoring: the server (which can mint any token) publishes another user key
    and a device for bob; bob's client reads the log's new entries and says so, while a
    device of his own certified meanwhile raises nothing."""
    bob = await people.device("bob")
    bob2 = await people.device("bob")  # his own new device: certified by his key
    await bob.check_own_keys()
    assert bob.events == []
    impostor_keys = UserKeys.generate(bob.user)
    account = DeviceAccount.generate()
    impostor = SecureClient(
        people.node.url, token(bob.user, device=account.device), bob.user, account, impostor_keys
    )
    await impostor.start()
    people.open.append(impostor)
    await bob.check_own_keys()
    assert {"kind": "key_changed", "user": bob.user, "change": "not ours", "blocked": False} in (
        bob.events
    )
    assert {"kind": "unknown_device", "user": bob.user, "device": account.device} in bob.events
    assert bob2.events == []  # not read yet: it sees both on its own watch
    await bob2.check_own_keys()
    assert sorted(e["kind"] for e in bob2.events) == ["key_changed", "unknown_device"]


async def test_a_revoked_device_reads_nothing_sent_after_even_in_a_session_it_held(
    people: People,
) -> None:
    """Revocation re-keys: alice's session reached bob's old device before he revoked it;
    her next message goes out under a new session that device never gets."""
    alice, bob = await people.device("alice"), await people.device("bob")
    old = await people.device("bob")
    ch = await people.room(alice, bob, old)
    await alice.send(ch, "one")
    assert (await next_message(old)).text == "one"
    await bob.revoke_device(old.device)
    await alice.send(ch, "two")
    assert (await read_until(bob, "two"))[-1].verified
    got = await next_message(old)
    assert got.text is None and got.error is not None  # a session it was never given


async def test_a_restarted_device_reads_what_came_while_it_was_away(people: People) -> None:
    """crypto/client_store.py: bob's phone saves its state and stops; alice goes on in the
    same session; the phone restored from the file reads it, verified, and still knows what
    it verified (a wrong passphrase opens nothing)."""
    from realtime_safety.crypto.client_store import restore, save

    alice, bob = await people.device("alice"), await people.device("bob")
    ch = await people.room(alice, bob)
    await alice.send(ch, "one")
    first = await next_message(bob)
    assert first.text == "one"
    bob.contacts.verify(alice.user, people.keys["alice"].public)
    fast = {"opslimit": 1, "memlimit": 8192}
    data = save(bob, "correct horse", **fast)
    await bob.client.close()
    await alice.send(ch, "two")
    with pytest.raises(CryptoError):
        restore(data, "wrong", people.node.url, token(bob.user), bob.user, people.keys["bob"])
    again = restore(
        data, "correct horse", people.node.url, token(bob.user, device=bob.device), bob.user,
        people.keys["bob"],
    )  # fmt: skip
    await again.start()
    people.open.append(again)
    await again.subscribe(ch, since_seq=first.seq)
    got = await next_message(again)
    assert (got.text, got.verified, got.user) == ("two", True, alice.user)
    assert again.contacts.state(alice.user) == "verified"
    assert again.events == []
