"""End-to-end encryption against a hostile server (issue 20): each attack, one test.

The honest users (alice, bob, carol) are E2EE v2 clients (`crypto.client_v2.SecureClient`: a
`UserKeys` per user shared by its devices, a `DeviceAccount` per device) connected through
`tests/hostile.py`'s proxy, which does to the wire what a malicious operator can: rewrite
replies, drop pushes, rewrite requests on the way in, forge pushes. The operator also holds the
key log's signing key (the node is started with `hostile.LOG_SEED`), so it can show one client
a log of its own making (`hostile_v2.Operator`). The attacker is a real account (mallory, or a
removed carol) or keys the attacker holds (an injected device, a stolen one). Every test runs
twice: `control` (the same story, no attack: the honest message goes through, and no security
event is raised) and `attack`, which asserts the SECURE outcome -- the attack is prevented, or
detected and shown. An attack v2 does not stop is an expected failure (`strict=True`) whose
reason names what is missing.

The client-facing vocabulary (crypto/client_v2.py):

- `message.verified: bool` on every result of `SecureClient.open` / `messages()` -- True only
  when the sender's device signature and its chain to the sender's user key verified. A
  message is *shown as genuine* when it has text, no `error`, and `verified` is True.
- `message.error: str | None` -- why a message is not shown.
- `client.events: list[dict]` -- security events the app shows the user, oldest first, each
  `{"kind": str, ...}`: `unknown_device` (a device entry that does not chain to its user's
  key or is not proven in the log), `key_changed` (a user key other than the one known),
  `member_not_in_signed_log` (the server's `members` names someone the signed membership log
  does not), `replay` (an envelope seen before), `fork` (two heads of the key log that cannot
  both be true: gossiped heads disagree). The controls require it to stay empty.
- Membership is the owner's signed log: `create_room`, `add_member`, `remove_member` on the
  owner's client (after the admin API call that the server's own access rules need).
- Revocation: `revoke_device(device)` on one of the user's other clients.
- Refusing to send raises `CryptoError` (or a subclass): a secure outcome under attack, a
  failure in a control.

The attacker's "can I read it?" checks are Megolm readers (`hostile_v2.megolm_reads`) over the
session keys the attacker could get: shares sent to a device it holds (opened with that
device's Olm state), or a stolen device's inbound sessions. v1 (`crypto.client`) believes the
server by design and is not run here.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nacl.pwhash
import pytest
from conftest import Node, token
from hostile import (
    Frame,
    Hit,
    HostileProxy,
    hostile,  # noqa: F401 (a fixture)
    hostile_node,  # noqa: F401 (a fixture)
    unique,
)
from hostile_v2 import (
    Operator,
    forged_device,
    forged_user_key,
    megolm_reads,
    now_ms,
    offer_device,
    published,
    sessions_of,
    stolen_session_keys,
)
from v2_devices import next_message, read_until
from wire import Raw, plain, until

from realtime_safety.client import ServerError
from realtime_safety.crypto.client_v2 import Decrypted, SecureClient
from realtime_safety.crypto.e2ee import CryptoError, frank_commitment
from realtime_safety.crypto.envelope import (
    DeviceAccount,
    InboundSessions,
    Olm,
    OutboundSession,
    encrypt_v2,
    make_share,
)
from realtime_safety.crypto.membership_state import sign_next
from realtime_safety.crypto.user_keys import UserKeys

ATTACK = pytest.mark.parametrize(
    "attack", [pytest.param(False, id="control"), pytest.param(True, id="attack")]
)


def still_open(reason: str) -> pytest.MarkDecorator:
    """An attack v2 does not stop: only a failed assertion counts as "the attack worked"."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


def attack_open(reason: str) -> Any:
    return pytest.mark.parametrize(
        "attack",
        [
            pytest.param(False, id="control"),
            pytest.param(True, id="attack", marks=still_open(reason)),
        ],
    )


# --- the vocabulary ----------------------------------------------------------------------


def kinds(*chats: SecureClient) -> set[str]:
    """The kinds of the security events the clients raised."""
    return {str(e.get("kind")) for chat in chats for e in chat.events}


def genuine(message: Decrypted) -> bool:
    """Shown to the user as a real message: text, no error, and verified."""
    return message.text is not None and message.error is None and message.verified is True


# --- the world: honest clients through the proxy -----------------------------------------


@dataclass
class World:
    node: Node
    proxy: HostileProxy
    op: Operator
    chats: list[SecureClient] = field(default_factory=list)
    keys: dict[str, UserKeys] = field(default_factory=dict)

    async def honest(self, name: str) -> SecureClient:
        """A user's honest client (a fresh user, its user key, one device), through the proxy."""
        return await self.device(unique(name))

    async def device(self, user: str, account: DeviceAccount | None = None) -> SecureClient:
        """Another client (device) of `user`, certified by the user's key, through the proxy."""
        keys = self.keys.setdefault(user, UserKeys.generate(user))
        account = account or DeviceAccount.generate()
        chat = SecureClient(self.proxy.url, token(user, device=account.device), user, account, keys)
        await chat.start()
        self.chats.append(chat)
        return chat

    async def room(self, owner: SecureClient, *others: SecureClient) -> str:
        """A new `room:`: the server's members (admin API), the owner's signed log (create,
        add), and every client given subscribed."""
        channel = f"room:{uuid.uuid4().hex[:10]}"
        users = list(dict.fromkeys([owner.user, *(o.user for o in others)]))
        for user in users:
            self.node.add_member(channel, user)
        await owner.create_room(channel)
        for user in users[1:]:
            await owner.add_member(channel, user)
        for chat in (owner, *others):
            await chat.subscribe(channel)
        return channel

    async def remove(self, owner: SecureClient, channel: str, user: str) -> None:
        r = self.node.api("DELETE", f"/v1/channels/{channel}/members/{user}")
        assert r.status_code == 204, r.text
        await owner.remove_member(channel, user)


@pytest.fixture
async def world(hostile_node: Node, hostile: HostileProxy) -> AsyncIterator[World]:  # noqa: F811
    w = World(hostile_node, hostile, Operator(hostile_node, hostile))
    yield w
    for chat in w.chats:
        await chat.client.close()
    await w.op.close()


async def absorb_rekey(proxy: HostileProxy, chat: SecureClient) -> None:
    """Wait until the node has pushed `rekey` to `chat`'s user; if the proxy delivered it,
    let the client handle what came before and it (as `messages()` would)."""
    await until(lambda: proxy.pushes("rekey", user=chat.user), what="the rekey push")
    if not any(s.frame is not None for s in proxy.seen("push", "rekey", user=chat.user)):
        return  # dropped by the attack
    async with asyncio.timeout(5):
        while (push := await chat.client.next_push()).get("push") != "rekey":
            await chat.handle(push)
    await chat.handle(push)


async def carol_reads_nothing_after(
    world: World, attack: bool, sender: SecureClient, reader: SecureClient, carol: SecureClient,
    ch: str,
) -> None:  # fmt: skip
    """After carol's removal (and whatever the attack dropped): `sender` writes; `reader`
    reads it in the control; carol, who kept the old session, reads nothing of it."""
    await absorb_rekey(world.proxy, sender)
    sent = await try_send(sender, ch, "after carol left")
    if not attack:
        assert sent is not None
        got = await read_until(reader, "after carol left")
        assert genuine(got[-1])
        assert kinds(sender, reader) == set()
    if sent is not None:
        push = await delivered(world.proxy, reader.user, ch, sent["seq"])
        assert await reads(carol, push) is None


async def try_send(chat: SecureClient, channel: str, text: str) -> dict[str, Any] | None:
    """Send; None when the client (`CryptoError`) or the node (`ServerError`) refuses --
    under attack, a refusal is a secure outcome."""
    try:
        return await chat.send(channel, text)
    except (CryptoError, ServerError):
        return None


def forged_message(like: Frame, body: dict[str, Any], **fields: Any) -> Frame:
    """A message push shaped like a real one (`like`), with another body; the proxy numbers it."""
    push = {k: v for k, v in like.items() if k != "seq"}
    return {**push, "client_msg_id": uuid.uuid4().hex, "body": body, **fields}


def strip_todevice(proxy: HostileProxy, sender: str, user: str) -> None:
    """Take every to-device message for `user` out of `sender`'s `todevice.send` before the
    node sees it (the attacker keeps the originals, in the proxy's log)."""

    def rule(request: Frame, _hit: Hit) -> Frame | None:
        kept = [m for m in request.get("messages", []) if m.get("user") != user]
        return {**request, "messages": kept} if kept else {"id": request.get("id"), "op": "ping"}

    proxy.on_request("todevice.send", rule, user=sender)


def add_to_members(proxy: HostileProxy, viewer: str, extra: str) -> None:
    def rule(reply: Frame, _hit: Hit) -> Frame:
        members = reply.get("members")
        if reply.get("ok") and isinstance(members, list) and extra not in members:
            return {**reply, "members": [*members, extra]}
        return reply

    proxy.on_reply("members", rule, user=viewer)


async def delivered(proxy: HostileProxy, user: str, channel: str, seq: int) -> Frame:
    """The message push of `channel` number `seq` as the node sent it to `user`."""
    found: list[Frame] = await until(
        lambda: [
            p
            for p in proxy.pushes("message", user=user)
            if (p.get("channel"), p.get("seq")) == (channel, seq)
        ],
        what=f"message {seq} to {user}",
    )
    return found[0]


async def reads(chat: SecureClient, push: Frame) -> str | None:
    """What `chat`'s client gets out of a message push the server hands it."""
    return (await chat.open(push)).text


async def olm_to(op: Operator, sender: DeviceAccount, user: str, device: str, curve: bytes) -> Olm:
    """An Olm session from the attacker's `sender` account to a real device, with a one-time
    key the operator claims from its own store (here: through its own connection)."""
    raw = await op.raw()
    claimed = await raw.ok("keys.claim", devices=[{"user": user, "device": device}])
    olm = Olm(sender)
    olm.start(user, device, curve, claimed["keys"][0]["key"])
    return olm


def todevice_id() -> str:
    """An id shaped like the node's to-device ids (docs/e2ee/server.md)."""
    return f"{now_ms():013d}|{os.urandom(8).hex()}"


def inject_todevice(proxy: HostileProxy, user: str, message: Frame, *, once: bool = True) -> None:
    """`message` added to the next `todevice.fetch` answer of `user`'s clients (or to every
    one: a server handing it out again however often it is acknowledged)."""
    done: list[bool] = []

    def rule(reply: Frame, _hit: Hit) -> Frame:
        if (done and once) or not reply.get("ok"):
            return reply
        done.append(True)
        return {**reply, "messages": [*reply["messages"], message]}

    proxy.on_reply("todevice.fetch", rule, user=user)


def stolen_state(chat: SecureClient) -> tuple[DeviceAccount, Olm, InboundSessions]:
    """Everything a thief of `chat`'s device gets at this moment: its account, its Olm
    sessions and its Megolm inbound sessions (copies: the honest client goes on)."""
    limits = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
              "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}  # fmt: skip
    account = DeviceAccount.load(chat.account.save("x", **limits), "x")
    olm = Olm.unpickle(account, chat.olm.pickle())
    inbound = InboundSessions.unpickle(chat.inbound.pickle(account.store_key), account.store_key)
    return account, olm, inbound


# --- 1-3: the directory ------------------------------------------------------------------


@ATTACK
async def test_device_injection(world: World, attack: bool) -> None:
    """Attack 1: an extra device for bob in alice's `keys.query` answer, the attacker's keys
    under a certificate the attacker signed (it has no bob user key), proven in a log the
    operator signed; alice may claim a one-time key for it. Secure: alice sends it no key
    (the attacker reads nothing) and raises `unknown_device`."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    ch = await world.room(alice, bob)
    evil = DeviceAccount.generate()
    if attack:
        await world.op.forge(alice.user, forged_device(UserKeys.generate(bob.user), evil))
        offer_device(world.proxy, alice.user, bob.user, evil)
    sent = await try_send(alice, ch, "the plan")
    if not attack:
        assert sent is not None
        got = await next_message(bob)
        assert genuine(got) and (got.text, got.user) == ("the plan", alice.user)
        assert kinds(alice, bob) == set()
    stolen = stolen_session_keys(world.proxy, bob.user, evil)
    assert megolm_reads(world.proxy, ch, sessions_of(stolen)) == []
    assert not world.proxy.sent_mentioning(alice.user, evil.device)
    if attack:
        assert "unknown_device" in kinds(alice)
        assert "fork" not in kinds(alice)  # the forged log held: the certificate is what failed


@ATTACK
async def test_member_injection(world: World, attack: bool) -> None:
    """Attack 2: mallory (a real account, never a member) added to alice's `members` answer.
    Secure: alice shares nothing with mallory (the recipients come from the signed log) and
    raises `member_not_in_signed_log`."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    mallory = await world.honest("mallory")
    ch = await world.room(alice, bob)
    if attack:
        add_to_members(world.proxy, alice.user, mallory.user)
        strip_todevice(world.proxy, alice.user, mallory.user)
    sent = await try_send(alice, ch, "the plan")
    if not attack:
        assert sent is not None
        got = await next_message(bob)
        assert genuine(got) and got.text == "the plan"
        assert kinds(alice, bob) == set()
    stolen = stolen_session_keys(world.proxy, mallory.user, mallory.account, mallory.olm)
    await mallory.handle({"push": "todevice", "device": mallory.device})
    assert megolm_reads(world.proxy, ch, sessions_of(stolen, mallory.inbound)) == []
    assert not world.proxy.sent_mentioning(alice.user, mallory.device)
    if attack:
        assert "member_not_in_signed_log" in kinds(alice)


@ATTACK
async def test_member_injection_by_a_forged_log_entry(world: World, attack: bool) -> None:
    """Attack 2, in the signed log: alice's `members.log.fetch` answers carry an entry adding
    mallory "by alice's device", signed by a key of the attacker's (mallory's device), and the
    `members` answer names mallory too. Secure: alice shares nothing with mallory (she refuses
    the log, and so to send, or leaves mallory out)."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    mallory = await world.honest("mallory")
    ch = await world.room(alice, bob)
    if attack:
        state = await alice.room(ch)
        entry = sign_next(
            state, mallory.account, op="add", target_user=mallory.user, role="member",
            actor_user=alice.user, actor_device=alice.device, ts_ms=now_ms(),
        )  # fmt: skip

        def forge(reply: Frame, hit: Hit) -> Frame:
            if not reply.get("ok") or (hit.request or {}).get("after") != state.epoch:
                return reply
            return {**reply, "entries": [entry.to_wire()], "epoch": entry.epoch}

        world.proxy.on_reply("members.log.fetch", forge, user=alice.user)
        add_to_members(world.proxy, alice.user, mallory.user)
        strip_todevice(world.proxy, alice.user, mallory.user)
    sent = await try_send(alice, ch, "the plan")
    if not attack:
        assert sent is not None
        got = await next_message(bob)
        assert genuine(got) and got.text == "the plan"
        assert kinds(alice, bob) == set()
    await mallory.handle({"push": "todevice", "device": mallory.device})
    assert megolm_reads(world.proxy, ch, sessions_of((), mallory.inbound)) == []
    assert not world.proxy.sent_mentioning(alice.user, mallory.device)


async def _key_substitution(world: World, attack: bool, *, verified: bool) -> None:
    alice, bob = await world.honest("alice"), await world.honest("bob")
    if verified:  # alice and bob compared safety numbers in person
        alice.contacts.verify(bob.user, bob.user_keys.public)
    ch = await world.room(alice, bob)
    fake = UserKeys.generate(bob.user)
    evil = DeviceAccount.generate(bob.device)  # bob's device id, the attacker's keys
    if attack:
        await world.op.forge(alice.user, forged_user_key(fake), forged_device(fake, evil))
        offer_device(world.proxy, alice.user, bob.user, evil)
    sent = await try_send(alice, ch, "the plan")
    if not attack:
        assert sent is not None
        got = await next_message(bob)
        assert genuine(got) and got.text == "the plan"
        assert kinds(alice, bob) == set()
    stolen = stolen_session_keys(world.proxy, bob.user, evil)
    assert megolm_reads(world.proxy, ch, sessions_of(stolen)) == []
    if attack:
        assert kinds(alice) & {"key_changed", "unknown_device"}
        assert "fork" not in kinds(alice)  # the forged log held: the key change is what showed


@ATTACK
async def test_key_substitution(world: World, attack: bool) -> None:
    """Attack 3: bob's user key replaced in alice's view (a reset to the attacker's key,
    appended to a log the operator signed, with bob's device id certified under it). alice
    had verified bob's safety number. Secure: alice sends nothing to the substituted key (the
    attacker reads nothing) and raises `key_changed`."""
    await _key_substitution(world, attack, verified=True)


@attack_open(
    "trust on first use: alice has neither verified bob nor seen his key before, so the "
    "newest user key the (forged) log shows is believed without an event; only comparing "
    "safety numbers, or gossiped heads once someone on the real log talks to alice "
    "(test_two_users_shown_different_directory_states), reveals it -- after the key went out"
)
async def test_key_substitution_unverified_first_contact(world: World, attack: bool) -> None:
    """Attack 3 on a contact alice never saw nor verified: the same forged reset."""
    await _key_substitution(world, attack, verified=False)


# --- 4: replay ---------------------------------------------------------------------------


@ATTACK
async def test_replay(world: World, attack: bool) -> None:
    """Attack 4: alice's envelope delivered to bob a second time under a new seq, with a
    `from.device` that does not exist. Secure: bob shows it once only (the copy is dropped
    or marked) and raises `replay`; no message is shown from the made-up device."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    ch = await world.room(alice, bob)
    await alice.send(ch, "pay carol 100")
    first = await next_message(bob)
    assert genuine(first) and first.text == "pay carol 100"
    if attack:
        original = world.proxy.pushes("message", user=bob.user)[-1]
        replayed = {k: v for k, v in original.items() if k != "seq"}
        replayed["from"] = {**original["from"], "device": "ghost-device"}
        await world.proxy.inject(bob.user, replayed)
    await alice.send(ch, "sentinel")
    between = (await read_until(bob, "sentinel"))[:-1]
    if not attack:
        assert between == [] and kinds(alice, bob) == set()
    assert [m.text for m in between if genuine(m)] == []
    assert [m for m in between if m.device == "ghost-device" and genuine(m)] == []
    if attack:
        assert "replay" in kinds(bob)


# --- 5: Megolm sessions the server hands out ---------------------------------------------


@ATTACK
async def test_session_of_the_servers_own(world: World, attack: bool) -> None:
    """Attack 5a: the server hands bob a Megolm session of its own as alice's (a forged
    to-device share "from alice's device", Olm-encrypted by an account of the attacker's) and
    then a message under it; alice meanwhile sends. Secure: bob takes no session from it and
    shows nothing under it as genuine, and alice never encrypts under it (the attacker reads
    none of her messages)."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    ch = await world.room(alice, bob)
    forger = DeviceAccount.generate(alice.device)
    evil = OutboundSession.new(ch, 2)
    if attack:
        bob_curve = published(world.proxy, bob.user, bob.device)["curve25519"]
        olm = await olm_to(world.op, forger, bob.user, bob.device, bob_curve)
        share = make_share(forger, evil, alice.user, bob.user, bob.device)
        kind, ct = olm.encrypt(bob.user, bob.device, bob_curve, share)
        sender = {"user": alice.user, "device": alice.device}
        forged = {"id": todevice_id(), "from": sender, "type": kind, "ct": ct, "ts": now_ms()}
        inject_todevice(world.proxy, bob.user, forged, once=False)  # bob must not loop on it
    sent = await try_send(alice, ch, "the plan")
    assert sent is not None
    got = await next_message(bob)
    assert genuine(got) and (got.text, got.user) == ("the plan", alice.user)
    if attack:
        like = world.proxy.pushes("message", user=bob.user)[-1]
        cmid = uuid.uuid4().hex
        body = encrypt_v2(forger, evil, ch, alice.user, cmid, "send me your password")
        await world.proxy.inject(bob.user, forged_message(like, body, client_msg_id=cmid))
    await alice.send(ch, "sentinel")
    between = (await read_until(bob, "sentinel"))[:-1]
    if not attack:
        assert between == [] and kinds(alice, bob) == set()
    assert [m.text for m in between if genuine(m)] == []
    assert (ch, alice.user, alice.device, evil.session_id) not in bob.inbound
    assert megolm_reads(world.proxy, ch, sessions_of([evil.session_key])) == []


@ATTACK
async def test_stale_session_after_removal(world: World, attack: bool) -> None:
    """Attack 5b: carol is removed (by alice, the owner); the `members.log` and `rekey` pushes
    to bob are dropped. Secure: carol (who holds bob's old session) cannot read bob's next
    message -- bob re-reads the signed log before sending and starts a new session."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    carol = await world.honest("carol")
    ch = await world.room(alice, bob, carol)
    await bob.send(ch, "before")
    for chat in (alice, bob, carol):
        assert (await next_message(chat)).text == "before"
    if attack:
        world.proxy.drop("rekey", user=bob.user)
        world.proxy.drop("members.log", user=bob.user)
    await world.remove(alice, ch, carol.user)
    await carol_reads_nothing_after(world, attack, bob, alice, carol, ch)


@ATTACK
async def test_other_rooms_session(world: World, attack: bool) -> None:
    """Attack 5c: room X's session passed off as room Y's: alice's message of X delivered to
    bob as one of Y, and mallory (a member of X only) holds X's session. Secure: bob does not
    show the X message as a Y message, and mallory reads nothing of Y."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    mallory = await world.honest("mallory")
    x = await world.room(alice, mallory)
    y = await world.room(alice, bob)
    await alice.send(x, "for x")
    assert (await next_message(mallory)).text == "for x"
    x_sessions = sessions_of((), mallory.inbound)
    assert x_sessions, "mallory holds room X's session"
    if attack:
        x_push = world.proxy.pushes("message", user=mallory.user)[-1]
        like = {k: v for k, v in x_push.items() if k != "seq"}
        await world.proxy.inject(bob.user, {**like, "channel": y})
    sent = await try_send(alice, y, "for y only")
    assert sent is not None
    between = await read_until(bob, "for y only")
    if not attack:
        assert len(between) == 1 and genuine(between[0])
        assert kinds(alice, bob) == set()
    assert [m.text for m in between[:-1] if genuine(m)] == []
    assert megolm_reads(world.proxy, y, x_sessions) == []


# --- 6: a removed member -----------------------------------------------------------------


@ATTACK
async def test_removed_member_kept_in_members(world: World, attack: bool) -> None:
    """Attack 6a: after carol's removal the proxy keeps her in alice's `members` answer.
    Secure: alice's new session does not go to carol (she reads nothing after her removal)
    and alice raises `member_not_in_signed_log`."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    carol = await world.honest("carol")
    ch = await world.room(alice, bob, carol)
    await alice.send(ch, "before")
    for chat in (alice, bob, carol):
        assert (await next_message(chat)).text == "before"
    await world.remove(alice, ch, carol.user)
    await absorb_rekey(world.proxy, alice)
    mark = world.proxy.mark()
    if attack:
        add_to_members(world.proxy, alice.user, carol.user)
        strip_todevice(world.proxy, alice.user, carol.user)
    sent = await try_send(alice, ch, "after carol left")
    if not attack:
        assert sent is not None
        got = await read_until(bob, "after carol left")
        assert genuine(got[-1])
        assert kinds(alice, bob) == set()
    await carol.handle({"push": "todevice", "device": carol.device})
    stolen = stolen_session_keys(world.proxy, carol.user, carol.account, carol.olm)
    assert megolm_reads(world.proxy, ch, sessions_of(stolen, carol.inbound), since=mark) == []
    assert not world.proxy.sent_mentioning(alice.user, carol.device, since=mark)
    if attack:
        assert "member_not_in_signed_log" in kinds(alice)


@ATTACK
async def test_removed_member_rekey_dropped(world: World, attack: bool) -> None:
    """Attack 6b: carol is removed by bob (the room's owner); the `members.log` and `rekey`
    pushes to alice are dropped, so nothing tells alice. Secure: carol cannot read alice's
    next message (alice re-reads the signed log before sending and rotates)."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    carol = await world.honest("carol")
    ch = await world.room(bob, alice, carol)
    await alice.send(ch, "before")
    for chat in (alice, bob, carol):
        assert (await next_message(chat)).text == "before"
    if attack:
        world.proxy.drop("rekey", user=alice.user)
        world.proxy.drop("members.log", user=alice.user)
    await world.remove(bob, ch, carol.user)  # not alice: she must learn of it
    await carol_reads_nothing_after(world, attack, alice, bob, carol, ch)


@attack_open(
    "the server may withhold the tail of the membership log: `members.log.fetch` has no "
    "signed head or freshness proof, so bob cannot tell that carol's removal exists and keeps "
    "sending under the session carol holds (needs a signed, gossiped membership head -- the "
    "epoch and entry hash inside each message, checked by receivers -- or an owner-signed "
    "heartbeat)"
)
async def test_removal_withheld_from_the_log(world: World, attack: bool) -> None:
    """Attack 5b/6b, the stronger form: carol's removal left out of bob's
    `members.log.fetch` answers as well as the pushes. Secure: carol reads nothing of bob's
    next message."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    carol = await world.honest("carol")
    ch = await world.room(alice, bob, carol)
    await bob.send(ch, "before")
    for chat in (alice, bob, carol):
        assert (await next_message(chat)).text == "before"
    if attack:
        known = (await bob.room(ch)).epoch

        def withhold(reply: Frame, _hit: Hit) -> Frame:
            if not reply.get("ok"):
                return reply
            entries = [e for e in reply["entries"] if e["epoch"] <= known]
            return {**reply, "entries": entries, "epoch": known}

        world.proxy.on_reply("members.log.fetch", withhold, user=bob.user)
        world.proxy.drop("rekey", user=bob.user)
        world.proxy.drop("members.log", user=bob.user)
        add_to_members(world.proxy, bob.user, carol.user)
    await world.remove(alice, ch, carol.user)
    await absorb_rekey(world.proxy, bob)
    sent = await try_send(bob, ch, "after carol left")
    if sent is not None:
        push = await delivered(world.proxy, alice.user, ch, sent["seq"])
        assert await reads(carol, push) is None


# --- 7: forward secrecy ------------------------------------------------------------------


@ATTACK
async def test_no_forward_secrecy(world: World, attack: bool) -> None:
    """Attack 7: bob's device is stolen after he read five messages: the thief has its
    account, Olm sessions and Megolm inbound sessions as they are then, and every frame the
    server saw. Secure (the v2 guarantee, docs/e2ee/messages.md): what the device has already
    read does not open with its current state -- the client keeps each inbound session
    ratcheted past the messages it read, and Olm's ratchet has moved past the shares. The
    control steals an unrelated device."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    ch = await world.room(alice, bob)
    texts = [f"message {i}" for i in range(5)]
    for text in texts:
        await alice.send(ch, text)
    got = [await next_message(bob) for _ in texts]
    assert [m.text for m in got] == texts and all(genuine(m) for m in got)
    assert kinds(alice, bob) == set()
    if attack:
        account, olm, inbound = stolen_state(bob)
    else:
        account = DeviceAccount.generate(bob.device)
        olm, inbound = Olm(account), InboundSessions()
    stolen = stolen_session_keys(world.proxy, bob.user, account, olm)
    assert megolm_reads(world.proxy, ch, sessions_of(stolen, inbound)) == []


# --- 8-10: what a message says -----------------------------------------------------------


@ATTACK
async def test_plaintext_downgrade(world: World, attack: bool) -> None:
    """Attack 8: an injected `{alg: "none", text}` push from alice in an encrypted room.
    Secure: bob's client refuses it (not shown as a message, or shown with an error)."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    ch = await world.room(alice, bob)
    await alice.send(ch, "hello")
    assert genuine(await next_message(bob))
    if attack:
        like = world.proxy.pushes("message", user=bob.user)[-1]
        body = {"v": 1, "alg": "none", "text": "click http://evil.example"}
        await world.proxy.inject(bob.user, forged_message(like, body))
    await alice.send(ch, "sentinel")
    between = (await read_until(bob, "sentinel"))[:-1]
    if not attack:
        assert between == [] and kinds(alice, bob) == set()
    assert [m.text for m in between if genuine(m)] == []


async def _forged_sender(world: World, attack: bool, *, reset: bool) -> None:
    alice, bob = await world.honest("alice"), await world.honest("bob")
    ch = await world.room(alice, bob)
    await alice.send(ch, "hello")
    assert genuine(await next_message(bob))
    if attack:
        fake_keys = UserKeys.generate(alice.user)
        fake = DeviceAccount.generate()
        entries = [forged_user_key(fake_keys)] if reset else []
        await world.op.forge(bob.user, *entries, forged_device(fake_keys, fake))
        evil = OutboundSession.new(ch, (await bob.room(ch)).rotation_epoch)
        bob_curve = published(world.proxy, bob.user, bob.device)["curve25519"]
        olm = await olm_to(world.op, fake, bob.user, bob.device, bob_curve)
        kind, ct = olm.encrypt(
            bob.user,
            bob.device,
            bob_curve,
            make_share(fake, evil, alice.user, bob.user, bob.device),
        )
        sender = {"user": alice.user, "device": fake.device}
        inject_todevice(
            world.proxy,
            bob.user,
            {"id": todevice_id(), "from": sender, "type": kind, "ct": ct, "ts": 1},
        )
        like = world.proxy.pushes("message", user=bob.user)[-1]
        cmid = uuid.uuid4().hex
        body = encrypt_v2(fake, evil, ch, alice.user, cmid, "send me your password")
        await world.proxy.inject(bob.user, forged_message(like, body, client_msg_id=cmid))
    await alice.send(ch, "sentinel")
    got = [await next_message(bob) for _ in range(2 if attack else 1)]
    assert got[-1].text == "sentinel" or attack  # under a reset, alice's own may not verify
    between = [m for m in got if m.text != "sentinel"]
    if not attack:
        assert between == [] and kinds(alice, bob) == set()
    assert [(m.user, m.text) for m in between if genuine(m)] == []


@ATTACK
async def test_forged_sender(world: World, attack: bool) -> None:
    """Attack 9: a fake alice device in bob's view (certified by a key the attacker made,
    proven in a log the operator signed), a share of an attacker session from it over Olm,
    and a message encrypted and signed with them. Secure: bob does not show it as alice's."""
    await _forged_sender(world, attack, reset=False)


@ATTACK
async def test_forged_sender_with_a_reset_user_key(world: World, attack: bool) -> None:
    """Attack 9 with alice's user key reset to the attacker's in bob's view (bob knew alice's
    key, unverified): the fake device chains to the new key. Secure: the client's default
    policy blocks a contact whose key was reset (not rotated by the old key) until the app
    confirms, so nothing from the new key is shown as alice's."""
    await _forged_sender(world, attack, reset=True)


@ATTACK
async def test_franking_frame_swap(world: World, attack: bool) -> None:
    """Attack 10: the `frank` commitment of alice's envelope replaced on the way by one to
    words she never wrote; mallory (a member, the attacker's account) reports them. Secure:
    no report of those words comes back verified (the publish is refused: v2 signs the
    commitment, or the report is unverified or refused). Control: an honest report verifies."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    mallory = await world.honest("mallory")
    ch = await world.room(alice, bob, mallory)
    lie, lie_key = "words alice never wrote", os.urandom(32)
    if attack:

        def swap(request: Frame, _hit: Hit) -> Frame:
            body = request.get("body", {})
            if "frank" not in body:
                return request
            return {**request, "body": {**body, "frank": frank_commitment(lie_key, lie)}}

        world.proxy.on_request("publish", swap, user=alice.user)
    sent = await try_send(alice, ch, "see you at five")
    if not attack:
        assert sent is not None
        got = await next_message(mallory)
        assert genuine(got) and got.text == "see you at five"
        assert (await mallory.report(got, "honest report"))["verified"] is True
        assert kinds(alice, bob, mallory) == set()
        return
    if sent is None:
        return  # refused before it was stored: nothing to frame alice with
    try:
        report = await mallory.client.request(
            "report",
            channel=ch,
            seq=sent["seq"],
            reason="framing alice",
            franking={"text": lie, "key": lie_key},
        )
    except ServerError:
        return
    assert report.get("verified") is not True


# --- beyond the ten: split views and revocation ------------------------------------------


@ATTACK
async def test_two_users_shown_different_directory_states(world: World, attack: bool) -> None:
    """alice is shown a log of the operator's making (bob's key reset to the attacker's, a
    device under it: appended, signed with the log key the operator holds), carol the real
    one; the real log then grows (carol adds a device). alice and carol talk: their clients
    gossip tree heads inside encrypted messages. Secure: the split is detected -- a `fork`
    event at one of the honest clients."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    carol = await world.honest("carol")
    ch = await world.room(alice, bob, carol)
    if attack:
        fake = UserKeys.generate(bob.user)
        evil = DeviceAccount.generate()
        await world.op.forge(alice.user, forged_user_key(fake), forged_device(fake, evil))
        offer_device(world.proxy, alice.user, bob.user, evil)
    await world.device(carol.user)  # the real log grows past where alice's view forked
    if await try_send(alice, ch, "one") is None:
        assert attack  # alice refused outright: no split left to see
        return
    assert (await next_message(carol)).text == "one"
    await carol.send(ch, "two")
    assert (await next_message(alice)).text == "one"
    assert (await next_message(alice)).text == "two"
    if not attack:
        got = [await next_message(bob), await next_message(bob)]
        assert [m.text for m in got] == ["one", "two"] and all(genuine(m) for m in got)
        assert kinds(alice, bob, carol) == set()
        return
    assert "fork" in kinds(alice, bob, carol)


@ATTACK
async def test_revoked_device_still_offered(world: World, attack: bool) -> None:
    """bob revokes his old device (its keys are in the attacker's hands); the server keeps
    offering it to alice: the revocation left out of her answers (`keys.query` proves each
    listed entry is in the log, not that the list is complete), a one-time key the thief
    made for it in her `keys.claim` answer, her to-device message to it taken out of the batch
    the node would refuse. Secure: alice's next session does not go to
    it (the thief reads nothing): before sharing, her client reads every new entry of the log,
    which must rebuild a verified head, and remembers the revocations it finds there. Control:
    nothing revoked, the old device reads as it should."""
    alice, bob = await world.honest("alice"), await world.honest("bob")
    old = await world.device(bob.user)
    ch = await world.room(alice, bob, old)
    mark = world.proxy.mark()
    if attack:
        await bob.revoke_device(old.device)
        await world.op.hide(alice.user, "revoke", bob.user)
        offer_device(world.proxy, alice.user, bob.user, old.account)  # the thief's one-time key
    sent = await try_send(alice, ch, "the plan")
    if not attack:
        assert sent is not None
        assert genuine(await next_message(bob))
        assert (await next_message(old)).text == "the plan"
        assert kinds(alice, bob) == set()
        return
    thief = stolen_state(old)
    stolen = stolen_session_keys(world.proxy, bob.user, thief[0], thief[1])
    assert megolm_reads(world.proxy, ch, sessions_of(stolen), since=mark) == []
    assert not world.proxy.sent_mentioning(alice.user, old.device, since=mark)


# --- the proxy itself --------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["rt.v1.json", "rt.v1.msgpack"])
async def test_the_proxy_speaks_both_codecs_and_applies_its_rules(
    hostile: HostileProxy,  # noqa: F811
    proto: str,
) -> None:
    """The fixture the attacks stand on: the client's subprotocol is passed through, rules
    fire for their op or kind and user only, requests are logged as sent, forged pushes are
    numbered into the sequence (bytes base64 for JSON), and the node's close code arrives."""
    ivy, jon = unique("ivy"), unique("jon")
    ch = f"public:{uuid.uuid4().hex[:8]}"
    reader = await Raw.open(hostile.url, token(ivy), proto=proto)
    writer = await Raw.open(hostile.url, token(jon), proto=proto)
    assert reader.ws.subprotocol == proto
    hostile.on_reply("ping", lambda reply, hit: {**reply, "asked": (hit.request or {})["op"]})
    hostile.on_reply("ping", lambda reply, _hit: {**reply, "jon": True}, user=jon)
    hostile.on_request(
        "publish",
        lambda req, _hit: (
            {**req, "body": plain("rewritten")} if req["body"]["text"] == "secret" else req
        ),
    )
    hostile.on_push(
        "message", lambda p, _hit: None if p["body"]["text"] == "drop me" else p, user=ivy
    )
    assert (await reader.ok("ping"))["asked"] == "ping"
    assert "jon" not in await reader.ok("ping")
    assert (await writer.ok("ping"))["jon"] is True
    await reader.ok("subscribe", channel=ch)
    for cmid, text in [("a", "one"), ("b", "secret"), ("c", "drop me"), ("d", "sentinel")]:
        await writer.ok("publish", channel=ch, client_msg_id=cmid, body=plain(text))
        if cmid == "a":
            assert (await reader.push())["seq"] == 1
            forged = {"push": "message", "channel": ch, "from": {"user": jon}, "blob": b"\1\2"}
            await hostile.inject(ivy, {**forged, "client_msg_id": "x", "body": plain("forged")})
    got = [await reader.push() for _ in range(3)]
    assert [(p["seq"], p["body"]["text"]) for p in got] == [
        (2, "forged"),
        (3, "rewritten"),
        (5, "sentinel"),  # the node's 4, after one forged push; its 3 was dropped: a gap
    ]
    assert got[0]["blob"] == ("AQI=" if proto == "rt.v1.json" else b"\1\2")
    assert [f["body"]["text"] for f in hostile.requests("publish", user=jon)] == [
        "one",
        "secret",  # as jon's client sent it
        "drop me",
        "sentinel",
    ]
    assert [s.frame is None for s in hostile.seen("push", "message", user=ivy)] == [
        False,
        False,
        True,
        False,
    ]
    stranger = await Raw.open(hostile.url, proto=proto)
    await stranger.send({"id": 1, "op": "auth", "token": "not a token"})
    assert await stranger.close_code() == 4003
    for raw in (reader, writer):
        await raw.close()
