"""E2EE v2 messages and key distribution (crypto/envelope.py, docs/e2ee/messages.md): round trips
between three devices over real vodozemac Olm/Megolm, one negative test per check, and the
committed vectors in tests/vectors/envelope-v2.json.

Regenerate the vectors (only when the format changes; the Megolm parts are new random bytes
each time): `python tests/test_crypto_envelope.py > tests/vectors/envelope-v2.json`."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nacl.pwhash
import pytest
import vodozemac
from nacl.signing import SigningKey

from realtime_safety.crypto import envelope as env
from realtime_safety.crypto import envelope_wire as wire
from realtime_safety.crypto.e2ee import CryptoError, DeviceKeys, frank_commitment
from realtime_safety.crypto.e2ee import encrypt as v1_encrypt

CHANNEL = "room:climbing-club"
T0 = 1_790_000_000_000
FAST = {
    "opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
    "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN,
}


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


# ---------------------------------------------------------------------------------------------
# a small world: users with one device each, Olm between them, a membership oracle


@dataclass
class Device:
    user: str
    account: env.DeviceAccount
    olm: env.Olm
    inbound: env.InboundSessions = field(default_factory=env.InboundSessions)
    guard: env.ReplayGuard = field(default_factory=env.ReplayGuard)

    @property
    def name(self) -> str:
        return self.account.device


def device(user: str, name: str) -> Device:
    account = env.DeviceAccount.generate(name)
    return Device(user, account, env.Olm(account))


MEMBERS = {("alice", "a1"), ("bob", "b1"), ("carol", "c1")}


def is_member(channel: str, user: str, device_id: str, epoch: int) -> bool:
    return channel == CHANNEL and (user, device_id) in MEMBERS


def wire_share(
    sender: Device, recipient: Device, outbound: env.OutboundSession
) -> tuple[int, bytes]:
    """What the sender puts in the to-device message: the share, Olm-encrypted."""
    peer = (recipient.user, recipient.name, recipient.account.curve25519)
    if not sender.olm.has_session(*peer):
        ((_, otk),) = recipient.account.new_one_time_keys(1).items()
        recipient.account.mark_published()
        sender.olm.start(*peer, otk)
    plaintext = env.make_share(
        sender.account, outbound, sender.user, recipient.user, recipient.name, now_ms=T0
    )
    return sender.olm.encrypt(*peer, plaintext)


def receive_share(recipient: Device, sender: Device, message: tuple[int, bytes]) -> env.KeyShare:
    opened = recipient.olm.decrypt(sender.user, sender.name, sender.account.curve25519, *message)
    share = env.open_share(
        opened,
        recipient.user,
        recipient.name,
        sender.account.ed25519,
        sender.account.curve25519,
        is_member=is_member,
    )
    assert recipient.inbound.add(share, now_ms=T0)
    return share


def distribute(sender: Device, outbound: env.OutboundSession, *recipients: Device) -> None:
    for r in recipients:
        receive_share(r, sender, wire_share(sender, r, outbound))


def open_at(reader: Device, sender: Device, body: Any, cmid: str, **kw: Any) -> env.Opened:
    channel = kw.pop("channel", CHANNEL)
    return env.decrypt_v2(
        body, channel, sender.user, cmid, sender.account.ed25519, reader.inbound, reader.guard, **kw
    )


@pytest.fixture
def trio() -> tuple[Device, Device, Device]:
    return device("alice", "a1"), device("bob", "b1"), device("carol", "c1")


@pytest.fixture
def sent(
    trio: tuple[Device, Device, Device],
) -> tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]]:
    """Alice's session shared with bob and carol, and one message from alice."""
    alice, bob, carol = trio
    out = env.OutboundSession.new(CHANNEL, epoch=3, now_ms=T0)
    distribute(alice, out, bob, carol)
    body = env.encrypt_v2(alice.account, out, CHANNEL, "alice", "m-1", "hi ✓", now_ms=T0 + 5)
    return alice, bob, carol, out, body


def expect(reason: str, fn: Any, *args: Any, **kw: Any) -> None:
    with pytest.raises(CryptoError) as err:
        fn(*args, **kw)
    assert reason in err.value.reason


# ---------------------------------------------------------------------------------------------
# the account


def test_account_keys_are_raw_and_its_signature_is_plain_ed25519() -> None:
    account = env.DeviceAccount.generate()
    assert account.device.startswith("d-") and len(account.ed25519) == 32
    assert len(account.curve25519) == 32
    sig = account.sign(b"statement")
    assert len(sig) == 64
    wire.verify(account.ed25519, b"statement", sig, "bad")
    expect("bad", wire.verify, account.ed25519, b"statemenT", sig, "bad")


def test_one_time_keys_are_new_each_call_and_published() -> None:
    account = env.DeviceAccount.generate("d")
    first = account.new_one_time_keys(2)
    second = account.new_one_time_keys(3)
    assert len(first) == 2 and len(second) == 3 and not set(first) & set(second)
    assert all(len(k) == 32 for k in [*first.values(), *second.values()])
    account.mark_published()
    assert account.olm_account.one_time_keys == {}


def test_account_saves_under_a_passphrase_and_refuses_another() -> None:
    account = env.DeviceAccount.generate("alice-phone")
    account.new_one_time_keys(1)
    data = account.save("correct horse", **FAST)
    back = env.DeviceAccount.load(data, "correct horse")
    assert (back.device, back.ed25519, back.curve25519, back.store_key) == (
        account.device,
        account.ed25519,
        account.curve25519,
        account.store_key,
    )
    assert set(back.olm_account.one_time_keys) == set(account.olm_account.one_time_keys)
    expect("wrong passphrase", env.DeviceAccount.load, data, "battery staple")
    outer = msgpack.unpackb(data, raw=False)
    assert outer["magic"] == b"rt-device-account-v2" and outer["v"] == 1
    assert outer["ops"] == FAST["opslimit"] and len(outer["salt"]) == 16
    box = bytearray(outer["box"])
    box[-1] ^= 1
    expect(
        "wrong passphrase",
        env.DeviceAccount.load,
        pack({**outer, "box": bytes(box)}),
        "correct horse",
    )
    expect("not a device account", env.DeviceAccount.load, pack({**outer, "magic": b"x"}), "")
    expect("version", env.DeviceAccount.load, pack({**outer, "v": 2}), "correct horse")


# ---------------------------------------------------------------------------------------------
# Olm


def test_olm_round_trip_prekey_then_normal_both_ways(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, _ = trio
    ((_, otk),) = bob.account.new_one_time_keys(1).items()
    a_to_b = ("bob", "b1", bob.account.curve25519)
    b_to_a = ("alice", "a1", alice.account.curve25519)
    expect("no Olm session", alice.olm.encrypt, *a_to_b, b"x")
    alice.olm.start(*a_to_b, otk)
    kind, ct = alice.olm.encrypt(*a_to_b, b"one")
    assert kind == env.OLM_PREKEY
    got = bob.olm.decrypt(*b_to_a, kind, ct)
    assert got == env.OlmPlaintext("alice", "a1", alice.account.curve25519, b"one")
    assert bob.account.olm_account.one_time_keys == {}  # used up
    kind2, ct2 = bob.olm.encrypt(*b_to_a, b"two")
    assert kind2 == env.OLM_NORMAL
    assert alice.olm.decrypt(*a_to_b, kind2, ct2).plaintext == b"two"
    kind3, ct3 = alice.olm.encrypt(*a_to_b, b"three")
    assert kind3 == env.OLM_NORMAL and bob.olm.decrypt(*b_to_a, kind3, ct3).plaintext == b"three"
    expect("no Olm session", bob.olm.decrypt, *b_to_a, kind3, ct3)  # replayed: key used up


def test_olm_refuses_a_prekey_message_from_another_key(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, carol = trio
    ((_, otk),) = bob.account.new_one_time_keys(1).items()
    carol.olm.start("bob", "b1", bob.account.curve25519, otk)
    kind, ct = carol.olm.encrypt("bob", "b1", bob.account.curve25519, b"I am alice")
    # the server says it comes from alice; bob uses alice's verified Curve25519 key
    expect(
        "pre-key message does not open",
        bob.olm.decrypt,
        "alice",
        "a1",
        alice.account.curve25519,
        kind,
        ct,
    )
    expect("not an Olm message", bob.olm.decrypt, "alice", "a1", alice.account.curve25519, 7, ct)


def test_olm_sessions_survive_pickling_and_need_the_store_key(
    trio: tuple[Device, Device, Device],
) -> None:
    alice, bob, _ = trio
    ((_, otk),) = bob.account.new_one_time_keys(1).items()
    alice.olm.start("bob", "b1", bob.account.curve25519, otk)
    bob.olm.decrypt(
        "alice",
        "a1",
        alice.account.curve25519,
        *alice.olm.encrypt("bob", "b1", bob.account.curve25519, b"1"),
    )
    data = alice.olm.pickle()
    alice2 = env.Olm.unpickle(alice.account, data)
    msg = alice2.encrypt("bob", "b1", bob.account.curve25519, b"2")
    assert bob.olm.decrypt("alice", "a1", alice.account.curve25519, *msg).plaintext == b"2"
    expect("does not open", env.Olm.unpickle, bob.account, data)


# ---------------------------------------------------------------------------------------------
# key shares


def test_a_share_names_channel_session_index_epoch_and_both_devices(
    trio: tuple[Device, Device, Device],
) -> None:
    alice, bob, _ = trio
    out = env.OutboundSession.new(CHANNEL, epoch=7, now_ms=T0)
    out.session.encrypt(b"advance")  # the share starts at the current index, 1
    share = receive_share(bob, alice, wire_share(alice, bob, out))
    assert share == env.KeyShare(
        CHANNEL, out.session_id, 1, out.session_key, "alice", "a1", "bob", "b1", 7, T0
    )
    assert (CHANNEL, "alice", "a1", out.session_id) in bob.inbound
    assert bob.inbound.epoch_of(share.ref) == 7


def _opened(recipient: Device, sender: Device, plaintext: bytes) -> env.OlmPlaintext:
    return env.OlmPlaintext(sender.user, sender.name, sender.account.curve25519, plaintext)


def _open(recipient: Device, sender: Device, plaintext: bytes, **kw: Any) -> env.KeyShare:
    olm = kw.pop("olm", _opened(recipient, sender, plaintext))
    args = {
        "expected_recipient_user": recipient.user,
        "expected_recipient_device": recipient.name,
        "sender_verified_ed25519": sender.account.ed25519,
        "sender_verified_curve25519": sender.account.curve25519,
        "is_member": is_member,
        **kw,
    }
    return env.open_share(olm, **args)


def test_a_share_for_another_recipient_is_refused(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, carol = trio
    out = env.OutboundSession.new(CHANNEL, 1, now_ms=T0)
    to_carol = env.make_share(alice.account, out, "alice", "carol", "c1", now_ms=T0)
    _open(carol, alice, to_carol)  # fine for carol
    expect("another recipient", _open, bob, alice, to_carol)  # the server forwards it to bob
    to_bob_other = env.make_share(alice.account, out, "alice", "bob", "b2", now_ms=T0)
    expect("another recipient", _open, bob, alice, to_bob_other)


def test_a_share_signed_by_a_non_member_device_is_refused(
    trio: tuple[Device, Device, Device],
) -> None:
    _, bob, _ = trio
    mallory = device("mallory", "m1")  # a real account, properly verified, not a member
    out = env.OutboundSession.new(CHANNEL, 1, now_ms=T0)
    share = env.make_share(mallory.account, out, "mallory", "bob", "b1", now_ms=T0)
    expect("not a member", _open, bob, mallory, share)
    other = env.OutboundSession.new("room:elsewhere", 1, now_ms=T0)
    alice = device("alice", "a1")
    share = env.make_share(alice.account, other, "alice", "bob", "b1", now_ms=T0)
    expect("not a member", _open, bob, alice, share)  # alice, but not of that channel


def test_a_share_must_be_signed_by_the_verified_key_of_its_sender(
    trio: tuple[Device, Device, Device],
) -> None:
    alice, bob, carol = trio
    out = env.OutboundSession.new(CHANNEL, 1, now_ms=T0)
    share = env.make_share(alice.account, out, "alice", "bob", "b1", now_ms=T0)
    expect(
        "bad share signature",
        _open,
        bob,
        alice,
        share,
        sender_verified_ed25519=carol.account.ed25519,
    )
    outer = msgpack.unpackb(share, raw=False)
    for i in (5, 40, len(outer["statement"]) - 1):  # a flipped byte anywhere
        st = bytearray(outer["statement"])
        st[i] ^= 1
        expect("bad share signature", _open, bob, alice, pack({**outer, "statement": bytes(st)}))
    expect("not a key share", _open, bob, alice, pack({**outer, "sig": b"x" * 63}))
    expect("not msgpack", _open, bob, alice, b"\xc1")


def test_a_share_through_another_devices_olm_session_is_refused(
    trio: tuple[Device, Device, Device],
) -> None:
    alice, bob, carol = trio
    out = env.OutboundSession.new(CHANNEL, 1, now_ms=T0)
    share = env.make_share(alice.account, out, "alice", "bob", "b1", now_ms=T0)
    # alice's statement replayed by carol over carol's own Olm session to bob
    via_carol = env.OlmPlaintext("carol", "c1", carol.account.curve25519, share)
    expect("another key than the sender's", _open, bob, alice, share, olm=via_carol)
    # the same, with carol's keys as the verified ones: the statement names alice
    expect(
        "another sender",
        _open,
        bob,
        carol,
        share,
        olm=via_carol,
        sender_verified_ed25519=alice.account.ed25519,
    )


def _signed_share(sender: Device, *fields: Any) -> bytes:
    statement = pack(["rt.v2.share", *fields])
    return pack({"statement": statement, "sig": sender.account.sign(statement)})


def test_a_share_whose_key_does_not_match_its_session_or_index_is_refused(
    trio: tuple[Device, Device, Device],
) -> None:
    alice, bob, _ = trio
    out, other = (env.OutboundSession.new(CHANNEL, 1, now_ms=T0) for _ in range(2))
    common = ("alice", "a1", "bob", "b1", 1, T0)
    good = _signed_share(alice, CHANNEL, out.session_id, 0, out.session_key, *common)
    _open(bob, alice, good)
    wrong_id = _signed_share(alice, CHANNEL, other.session_id, 0, out.session_key, *common)
    expect("another session", _open, bob, alice, wrong_id)
    wrong_index = _signed_share(alice, CHANNEL, out.session_id, 1, out.session_key, *common)
    expect("another index", _open, bob, alice, wrong_index)
    junk_key = _signed_share(alice, CHANNEL, out.session_id, 0, b"\0" * 229, *common)
    expect("no valid Megolm session key", _open, bob, alice, junk_key)
    short = _signed_share(alice, CHANNEL, out.session_id, 0, out.session_key, *common[:-1])
    expect("not a key share statement", _open, bob, alice, short)
    bad_type = _signed_share(alice, CHANNEL, out.session_id, "0", out.session_key, *common)
    expect("wrong shape", _open, bob, alice, bad_type)


# ---------------------------------------------------------------------------------------------
# messages: round trips


def test_three_devices_exchange_messages_in_both_directions(
    trio: tuple[Device, Device, Device],
) -> None:
    outs = {d.user: env.OutboundSession.new(CHANNEL, 1, now_ms=T0) for d in trio}
    for d in trio:
        distribute(d, outs[d.user], *[r for r in trio if r is not d])
    for n, d in enumerate(trio):
        for i in range(3):
            cmid = f"{d.user}-{i}"
            body = env.encrypt_v2(
                d.account,
                outs[d.user],
                CHANNEL,
                d.user,
                cmid,
                f"{d.user} says {i}",
                sth=bytes([n, i]),
                now_ms=T0 + i,
            )
            assert body["index"] == i and set(body) == env.BODY_KEYS
            env.server_verify_v2(body, CHANNEL, d.user, cmid, d.account.ed25519)
            for r in trio:
                if r is not d:
                    got = open_at(r, d, body, cmid)
                    assert (got.text, got.ts, got.sth) == (
                        f"{d.user} says {i}",
                        T0 + i,
                        bytes([n, i]),
                    )
                    assert got.verified and got.version == 2 and got.epoch == 1
                    assert frank_commitment(got.franking_key, got.text) == body["frank"]
    assert outs["alice"].count == 3


def test_encrypt_uses_the_given_franking_key_and_time(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, out, _ = sent
    body = env.encrypt_v2(
        alice.account, out, CHANNEL, "alice", "m-2", "x", now_ms=T0 + 9, fk=b"k" * 32
    )
    got = open_at(bob, alice, body, "m-2")
    assert got.franking_key == b"k" * 32 and got.ts == T0 + 9 and got.sth is None
    assert body["frank"] == hmac.new(b"k" * 32, b"x", hashlib.sha256).digest()


# ---------------------------------------------------------------------------------------------
# messages: one negative test per check


def test_tampered_mm_is_refused(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, _, body = sent
    mm = bytearray(body["mm"])
    mm[12] ^= 1
    expect("bad signature", open_at, bob, alice, {**body, "mm": bytes(mm)}, "m-1")
    expect(
        "mm is not signed by its session",
        env.server_verify_v2,
        {**body, "mm": bytes(mm)},
        CHANNEL,
        "alice",
        "m-1",
        alice.account.ed25519,
    )


def test_a_valid_signature_does_not_excuse_a_megolm_message_that_fails(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    """Even a sender-signed envelope must open under the held session (a compromised device
    key alone cannot inject text under someone's Megolm session)."""
    alice, bob, _, _, body = sent
    mm = bytearray(body["mm"])
    mm[12] ^= 1
    forged = _resign(alice, {**body, "mm": bytes(mm)}, "m-1")
    expect("does not open", open_at, bob, alice, forged, "m-1")


def _resign(
    sender: Device, body: dict[str, Any], cmid: str, channel: str = CHANNEL
) -> dict[str, Any]:
    statement = env.message_statement(
        channel,
        sender.user,
        body["device"],
        body["session"],
        body["index"],
        cmid,
        body["ts"],
        body["frank"],
        body["mm"],
    )
    return {**body, "sig": sender.account.sign(statement)}


def test_a_swapped_session_is_refused(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, carol, _, body = sent
    second = env.OutboundSession.new(CHANNEL, 3, now_ms=T0)
    distribute(alice, second, bob)
    swapped = {**body, "session": second.session_id}
    expect("bad signature", open_at, bob, alice, swapped, "m-1")
    # signed by alice but pointing at her other session: the mm is not from it
    expect("does not open", open_at, bob, alice, _resign(alice, swapped, "m-1"), "m-1")
    # carol's session id under alice's name: bob holds carol's session only for carol
    carol_out = env.OutboundSession.new(CHANNEL, 3, now_ms=T0)
    distribute(carol, carol_out, bob)
    stolen = _resign(alice, {**body, "session": carol_out.session_id}, "m-1")
    expect("no key for that sender", open_at, bob, alice, stolen, "m-1")


def test_the_wrong_channel_is_refused(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, _, body = sent
    expect("bad signature", open_at, bob, alice, body, "m-1", channel="room:other")
    resigned = _resign(alice, body, "m-1", channel="room:other")
    expect("no key for that sender", open_at, bob, alice, resigned, "m-1", channel="room:other")


def test_the_wrong_client_msg_id_is_refused(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, _, body = sent
    expect("bad signature", open_at, bob, alice, body, "m-2")
    open_at(bob, alice, body, "m-1")


def test_the_wrong_index_is_refused(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, _, body = sent
    expect("bad signature", open_at, bob, alice, {**body, "index": 1}, "m-1")
    lying = _resign(alice, {**body, "index": 1}, "m-1")
    expect("index is not the envelope's", open_at, bob, alice, lying, "m-1")
    expect(
        "index is not the envelope's",
        env.server_verify_v2,
        lying,
        CHANNEL,
        "alice",
        "m-1",
        alice.account.ed25519,
    )


def test_the_wrong_sender_device_or_user_is_refused(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, carol, _, body = sent
    # the server relabels the envelope as carol's device: carol's key does not verify it
    relabelled = {**body, "device": "c1"}
    expect(
        "bad signature",
        env.decrypt_v2,
        relabelled,
        CHANNEL,
        "carol",
        "m-1",
        carol.account.ed25519,
        bob.inbound,
        bob.guard,
    )
    # or keeps alice's device but says another user sent it
    expect(
        "bad signature",
        env.decrypt_v2,
        body,
        CHANNEL,
        "carol",
        "m-1",
        alice.account.ed25519,
        bob.inbound,
        bob.guard,
    )
    # or names a device alice does not have (the identity layer gives the key of a1 only)
    expect("bad signature", open_at, bob, alice, {**body, "device": "a2"}, "m-1")


def _signed_body(sender: Device, out: env.OutboundSession, payload: bytes, cmid: str) -> Any:
    """An envelope the sender's device really signed, around an arbitrary Megolm plaintext."""
    index = out.message_index
    mm = out.session.encrypt(payload).to_bytes()
    body = {
        "v": 2,
        "alg": "megolm.v1",
        "device": sender.name,
        "session": out.session_id,
        "index": index,
        "ts": T0,
        "mm": mm,
        "sig": b"",
        "frank": b"f" * 32,
    }
    return _resign(sender, body, cmid)


def test_a_payload_of_the_wrong_shape_is_refused(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, out, _ = sent
    fk = b"k" * 32
    bad = [
        pack({"text": "t", "fk": fk, "ts": T0}),  # no sth
        pack({"text": "t", "fk": fk, "ts": T0, "sth": None, "extra": 1}),
        pack({"text": "t", "fk": fk, "ts": T0, "sth": b"s" * 4097}),
        pack({"text": b"t", "fk": fk, "ts": T0, "sth": None}),
        pack(["t", fk, T0, None]),
    ]
    for n, payload in enumerate(bad):
        body = _signed_body(alice, out, payload, f"x-{n}")
        expect("payload has the wrong shape", open_at, bob, alice, body, f"x-{n}")
    body = _signed_body(alice, out, b"\xc1", "x-9")
    expect("payload is not msgpack", open_at, bob, alice, body, "x-9")


def test_the_payload_time_must_be_the_envelope_time(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, out, _ = sent
    body = env.encrypt_v2(alice.account, out, CHANNEL, "alice", "m-2", "t", now_ms=T0 + 100)
    backdated = _resign(alice, {**body, "ts": T0}, "m-2")
    expect("payload time", open_at, bob, alice, backdated, "m-2")


def test_a_swapped_frank_is_refused(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, _, body = sent
    other = hmac.new(b"f" * 32, b"words alice never wrote", hashlib.sha256).digest()
    expect("bad signature", open_at, bob, alice, {**body, "frank": other}, "m-1")
    expect(
        "franking commitment",
        open_at,
        bob,
        alice,
        _resign(alice, {**body, "frank": other}, "m-1"),
        "m-1",
    )


def test_a_replay_is_refused_but_the_same_stored_message_reads_again(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, _, body = sent
    open_at(bob, alice, body, "m-1", seq=10)
    open_at(bob, alice, body, "m-1", seq=10)  # history fetched again: the same message
    expect("replay", open_at, bob, alice, body, "m-1", seq=11)  # re-delivered under a new seq
    expect("replay", open_at, bob, alice, body, "m-1")


def test_without_seq_every_second_sighting_is_a_replay(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, _, body = sent
    open_at(bob, alice, body, "m-1")
    expect("replay", open_at, bob, alice, body, "m-1")


def test_an_unknown_session_and_a_missing_field_are_refused(
    trio: tuple[Device, Device, Device],
) -> None:
    alice, bob, _ = trio
    out = env.OutboundSession.new(CHANNEL, 1, now_ms=T0)
    body = env.encrypt_v2(alice.account, out, CHANNEL, "alice", "m-1", "hi", now_ms=T0)
    expect("no key for that sender", open_at, bob, alice, body, "m-1")  # never shared with bob
    for key in ("sig", "frank", "index", "mm"):
        short = {k: v for k, v in body.items() if k != key}
        expect("wrong fields", open_at, bob, alice, short, "m-1")
    expect("wrong type or size", open_at, bob, alice, {**body, "index": True}, "m-1")
    expect("wrong type or size", open_at, bob, alice, {**body, "frank": b"x" * 31}, "m-1")
    expect("not a map", open_at, bob, alice, [body], "m-1")


# ---------------------------------------------------------------------------------------------
# plaintext, v1 and the server


def test_plaintext_is_refused_in_an_encrypted_channel_and_v1_is_routed() -> None:
    plain = {"v": 1, "alg": "none", "text": "hello from alice"}
    expect("plaintext in an encrypted channel", env.classify, plain, True)
    assert env.classify(plain, False) == "plain"
    assert env.classify({"v": 2, "alg": "megolm.v1"}, True) == "v2"
    assert env.classify({"v": 1, "alg": "xchacha20poly1305"}, True) == "v1"
    expect(
        "moved to v2", env.classify, {"v": 1, "alg": "xchacha20poly1305"}, True, v1_allowed=False
    )
    assert env.classify({"v": 2, "alg": "megolm.v1"}, True, v1_allowed=False) == "v2"
    expect("unknown envelope", env.classify, {"v": 3, "alg": "megolm.v1"}, True)
    expect("unknown envelope", env.classify, {"v": True, "alg": "xchacha20poly1305"}, True)
    expect("unknown envelope", env.classify, {"v": 2, "alg": "xchacha20poly1305"}, True)
    expect("not a map", env.classify, "hello", True)


def test_a_v1_envelope_stays_readable_and_says_unverified() -> None:
    keys = DeviceKeys.generate("old-phone")
    channel_key = b"c" * 32
    body = v1_encrypt(keys, CHANNEL, "v1-1", "k1", channel_key, "from v1")
    assert env.classify(body, True) == "v1"
    guard = env.ReplayGuard()
    got = env.open_v1(body, CHANNEL, "alice", "v1-1", channel_key, keys.signing_public, guard)
    assert (got.text, got.verified, got.version, got.ts) == ("from v1", False, 1, None)
    expect(
        "replay",
        env.open_v1,
        body,
        CHANNEL,
        "alice",
        "v1-1",
        channel_key,
        keys.signing_public,
        guard,
    )
    expect(
        "bad signature",
        env.open_v1,
        body,
        CHANNEL,
        "alice",
        "v1-1",
        channel_key,
        DeviceKeys.generate().signing_public,
    )


def test_the_server_check_refuses_bad_shapes_and_signatures(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, _, carol, _, body = sent
    args = (CHANNEL, "alice", "m-1", alice.account.ed25519)
    env.server_verify_v2(body, *args)
    expect("wrong fields", env.server_verify_v2, {**body, "ftag": b"x"}, *args)
    expect("wrong type or size", env.server_verify_v2, {**body, "v": 1}, *args)
    expect("wrong type or size", env.server_verify_v2, {**body, "alg": "none"}, *args)
    expect("wrong type or size", env.server_verify_v2, {**body, "session": "short"}, *args)
    expect("wrong type or size", env.server_verify_v2, {**body, "device": "d" * 65}, *args)
    expect("wrong type or size", env.server_verify_v2, {**body, "mm": b"x" * 65537}, *args)
    expect("not a Megolm message", env.server_verify_v2, {**body, "mm": b"\x03junk"}, *args)
    expect(
        "bad signature", env.server_verify_v2, body, CHANNEL, "alice", "m-1", carol.account.ed25519
    )
    expect(
        "bad signature", env.server_verify_v2, body, CHANNEL, "alice", "m-2", alice.account.ed25519
    )
    # a receiver tolerates the server's ftag (it never reads it)
    assert env._check_body({**body, "ftag": b"x"}, strict=False)


# ---------------------------------------------------------------------------------------------
# rotation and forward secrecy


def test_rotation_rules() -> None:
    out = env.OutboundSession.new(CHANNEL, epoch=4, now_ms=T0)
    assert not out.needs_rotation(T0, 4)
    assert out.needs_rotation(T0, 5)  # membership changed
    assert out.needs_rotation(T0 + env.ROTATE_AFTER_MS, 4)
    assert not out.needs_rotation(T0 + env.ROTATE_AFTER_MS - 1, 4)
    out.count = env.ROTATE_AFTER_MESSAGES - 1
    assert not out.needs_rotation(T0, 4)
    out.count = env.ROTATE_AFTER_MESSAGES
    assert out.needs_rotation(T0, 4)


def test_encrypt_refuses_a_session_that_must_be_rotated_or_is_for_another_channel() -> None:
    alice = device("alice", "a1")
    out = env.OutboundSession.new(CHANNEL, epoch=4, now_ms=T0)
    send = env.encrypt_v2
    expect("another channel", send, alice.account, out, "room:x", "alice", "m", "t", now_ms=T0)
    expect("rotated", send, alice.account, out, CHANNEL, "alice", "m", "t", now_ms=T0, epoch=5)
    expect(
        "rotated",
        send,
        alice.account,
        out,
        CHANNEL,
        "alice",
        "m",
        "t",
        now_ms=T0 + env.ROTATE_AFTER_MS,
    )
    out.count = env.ROTATE_AFTER_MESSAGES - 1
    send(alice.account, out, CHANNEL, "alice", "m", "t", now_ms=T0, epoch=4)
    expect("rotated", send, alice.account, out, CHANNEL, "alice", "m2", "t", now_ms=T0)
    expect(
        "franking key",
        send,
        alice.account,
        env.OutboundSession.new(CHANNEL, 4, now_ms=T0),
        CHANNEL,
        "alice",
        "m",
        "t",
        now_ms=T0,
        fk=b"short",
    )


def test_a_late_share_opens_only_from_its_index_and_ratchet_to_forgets_the_past(
    trio: tuple[Device, Device, Device],
) -> None:
    alice, bob, carol = trio
    out = env.OutboundSession.new(CHANNEL, 1, now_ms=T0)
    distribute(alice, out, bob)
    bodies = [
        env.encrypt_v2(alice.account, out, CHANNEL, "alice", f"m-{i}", f"t{i}", now_ms=T0 + i)
        for i in range(3)
    ]
    distribute(alice, out, carol)  # carol joins at index 3: she cannot read 0-2
    expect("does not open", open_at, carol, alice, bodies[0], "m-0")
    late = env.encrypt_v2(alice.account, out, CHANNEL, "alice", "m-3", "t3", now_ms=T0 + 3)
    assert open_at(carol, alice, late, "m-3").text == "t3"
    # bob reads message 0, then ratchets past it: a thief of bob's store cannot reopen it
    ref = (CHANNEL, "alice", "a1", out.session_id)
    assert open_at(bob, alice, bodies[0], "m-0").text == "t0"
    bob.inbound.ratchet_to(ref, 1)
    thief = env.ReplayGuard()
    expect(
        "does not open",
        env.decrypt_v2,
        bodies[0],
        CHANNEL,
        "alice",
        "m-0",
        alice.account.ed25519,
        bob.inbound,
        thief,
    )
    assert open_at(bob, alice, bodies[1], "m-1").text == "t1"


def test_a_later_share_does_not_replace_an_earlier_one(trio: tuple[Device, Device, Device]) -> None:
    alice, bob, _ = trio
    out = env.OutboundSession.new(CHANNEL, 1, now_ms=T0)
    distribute(alice, out, bob)
    out.session.encrypt(b"x")
    opened = bob.olm.decrypt("alice", "a1", alice.account.curve25519, *wire_share(alice, bob, out))
    share = env.open_share(
        opened, "bob", "b1", alice.account.ed25519, alice.account.curve25519, is_member=is_member
    )
    assert share.first_index == 1 and not bob.inbound.add(share)
    ref = share.ref
    session = bob.inbound.get(ref)
    assert session is not None and session.first_known_index == 0


def test_forget_before_deletes_by_age_epoch_and_channel(
    trio: tuple[Device, Device, Device],
) -> None:
    alice, bob, _ = trio
    shares = []
    for epoch, channel in ((1, CHANNEL), (2, CHANNEL), (1, "room:b")):
        out = env.OutboundSession.new(channel, epoch, now_ms=T0)
        stmt = env.make_share(alice.account, out, "alice", "bob", "b1", now_ms=T0)
        share = env.open_share(
            _opened(bob, alice, stmt),
            "bob",
            "b1",
            alice.account.ed25519,
            alice.account.curve25519,
            is_member=lambda *_: True,
        )
        shares.append(share)
        bob.inbound.add(share, now_ms=T0 + epoch)
    assert bob.inbound.forget_before(channel=CHANNEL, epoch_below=2) == 1
    assert shares[0].ref not in bob.inbound and shares[2].ref in bob.inbound
    assert bob.inbound.forget_before(received_before_ms=T0 + 2) == 1  # room:b's, at T0 + 1
    assert len(bob.inbound) == 1 and bob.inbound.delete(shares[1].ref)
    assert not bob.inbound.delete(shares[1].ref) and len(bob.inbound) == 0


def test_session_stores_survive_pickling_under_the_store_key(
    sent: tuple[Device, Device, Device, env.OutboundSession, dict[str, Any]],
) -> None:
    alice, bob, _, out, body = sent
    key = bob.account.store_key
    back = env.InboundSessions.unpickle(bob.inbound.pickle(key), key)
    got = env.decrypt_v2(
        body, CHANNEL, "alice", "m-1", alice.account.ed25519, back, env.ReplayGuard()
    )
    assert got.text == "hi ✓" and got.epoch == 3
    expect("does not open", env.InboundSessions.unpickle, bob.inbound.pickle(key), b"\0" * 32)
    out2 = env.OutboundSession.unpickle(
        out.pickle(alice.account.store_key), alice.account.store_key
    )
    assert (out2.channel, out2.session_id, out2.epoch, out2.count, out2.created_ms) == (
        CHANNEL,
        out.session_id,
        3,
        1,
        T0,
    )
    expect("inbound store is damaged", env.InboundSessions.unpickle, out.pickle(key), key)


# ---------------------------------------------------------------------------------------------
# the replay guard's bounds and persistence


def test_replay_guard_remembers_ids_across_sessions_and_persists() -> None:
    guard = env.ReplayGuard()
    guard.check("alice", "a1", "S1", 0, "m-1")
    expect("replay", guard.check, "alice", "a1", "S2", 0, "m-1")  # same id, another session
    guard.check("alice", "a2", "S1", 0, "m-1")  # another device: its own namespace
    guard.check("bob", "a1", "S1", 0, "m-1")  # another user
    back = env.ReplayGuard.from_bytes(guard.to_bytes())
    expect("replay", back.check, "alice", "a1", "S1", 0, "m-9")
    expect("replay", back.check, "alice", "a1", "S9", 5, "m-1")
    back.check("alice", "a1", "S1", 1, "m-2")
    expect("replay store is damaged", env.ReplayGuard.from_bytes, pack({"x": 1}))


def test_replay_guard_is_bounded_and_fails_closed_inside_a_session() -> None:
    guard = env.ReplayGuard(max_sessions=2, max_per_session=3, max_ids=4)
    for i in range(5):
        guard.check("alice", "a1", "S1", i, f"m-{i}")
    held = guard._sessions["alice", "a1", "S1"]
    assert len(held.indices) == 3 and held.floor == 2
    assert guard.seen("alice", "a1", "S1", 1, "fresh")  # below the floor: refused
    assert len(guard._ids) == 4
    guard.check("alice", "a1", "S2", 0, "n-0")
    guard.check("alice", "a1", "S3", 0, "n-1")
    assert list(guard._sessions) == [("alice", "a1", "S2"), ("alice", "a1", "S3")]
    back = env.ReplayGuard.from_bytes(guard.to_bytes())
    assert (back.max_sessions, back.max_per_session, back.max_ids) == (2, 3, 4)
    assert back.seen("alice", "a1", "S3", 0, "zzz")


# ---------------------------------------------------------------------------------------------
# committed vectors

FILE = Path(__file__).parent / "vectors" / "envelope-v2.json"

INPUTS: dict[str, Any] = {
    "channel": CHANNEL,
    "sender_user": "alice",
    "sender_device": "alice-phone-7f3a",
    "recipient_user": "bob",
    "recipient_device": "bob-laptop-19c2",
    "signing_seed": bytes(range(50, 82)).hex(),
    "curve25519_stand_in": bytes(range(150, 182)).hex(),
    "epoch": 7,
    "share_ts": 1790000000000,
    "messages": [
        {
            "client_msg_id": "0b2c9a1e-msg-1",
            "text": "see you at the wall at 7 ✓",
            "franking_key": bytes(range(100, 132)).hex(),
            "ts": 1790000000123,
            "sth": None,
        },
        {
            "client_msg_id": "0b2c9a1e-msg-2",
            "text": "bring the rope",
            "franking_key": bytes(range(132, 164)).hex(),
            "ts": 1790000004567,
            "sth": bytes(range(0, 40)).hex(),
        },
    ],
}


def _payload(m: dict[str, Any]) -> bytes:
    sth = None if m["sth"] is None else bytes.fromhex(m["sth"])
    fk = bytes.fromhex(m["franking_key"])
    return pack({"text": m["text"], "fk": fk, "ts": m["ts"], "sth": sth})


def record(i: dict[str, Any]) -> dict[str, Any]:
    """New Megolm material (vodozemac draws its own randomness): a session key at index 0, the
    documented payloads encrypted as messages 0 and 1, and the key exported at index 1."""
    group = vodozemac.GroupSession()
    session_key = group.session_key.to_base64()
    mms = [group.encrypt(_payload(m)).to_bytes().hex() for m in i["messages"]]
    inbound = vodozemac.InboundGroupSession(vodozemac.SessionKey(session_key))
    exported = inbound.export_at(1)
    assert exported is not None
    return {
        "session_id": group.session_id,
        "session_key_base64": session_key,
        "mm": mms,
        "exported_at_1_base64": exported.to_base64(),
    }


def make(i: dict[str, Any], megolm: dict[str, Any]) -> dict[str, Any]:
    """Every other byte string, from the documented steps with msgpack, hashlib and PyNaCl
    alone (not crypto/envelope.py)."""
    signing = SigningKey(bytes.fromhex(i["signing_seed"]))
    session_key = env.b64_decode(megolm["session_key_base64"])
    share_statement = pack(
        [
            "rt.v2.share",
            i["channel"],
            megolm["session_id"],
            0,
            session_key,
            i["sender_user"],
            i["sender_device"],
            i["recipient_user"],
            i["recipient_device"],
            i["epoch"],
            i["share_ts"],
        ]
    )
    share_sig = signing.sign(share_statement).signature
    messages = []
    for index, (m, mm_hex) in enumerate(zip(i["messages"], megolm["mm"], strict=True)):
        mm = bytes.fromhex(mm_hex)
        frank = hmac.new(bytes.fromhex(m["franking_key"]), m["text"].encode(), hashlib.sha256)
        statement = pack(
            [
                "rt.v2.msg",
                i["channel"],
                i["sender_user"],
                i["sender_device"],
                megolm["session_id"],
                index,
                m["client_msg_id"],
                m["ts"],
                frank.digest(),
                hashlib.sha256(mm).digest(),
            ]
        )
        sig = signing.sign(statement).signature
        body = {
            "v": 2,
            "alg": "megolm.v1",
            "device": i["sender_device"],
            "session": megolm["session_id"],
            "index": index,
            "ts": m["ts"],
            "mm": mm,
            "sig": sig,
            "frank": frank.digest(),
        }
        messages.append(
            {
                "payload": _payload(m).hex(),
                "frank": frank.hexdigest(),
                "mm_sha256": hashlib.sha256(mm).hexdigest(),
                "signed": statement.hex(),
                "sig": sig.hex(),
                "body_msgpack": pack(body).hex(),
            }
        )
    return {
        "inputs": i,
        "megolm": megolm,
        "ed25519": bytes(signing.verify_key).hex(),
        "session_key": session_key.hex(),
        "share_signed": share_statement.hex(),
        "share_sig": share_sig.hex(),
        "share_plaintext": pack({"statement": share_statement, "sig": share_sig}).hex(),
        "messages": messages,
    }


def committed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FILE.read_text())
    return data


def test_the_committed_vector_is_what_the_documented_steps_give() -> None:
    v = committed()
    assert v["inputs"] == INPUTS
    assert v == make(v["inputs"], v["megolm"])


def test_the_committed_megolm_messages_open_to_the_documented_payloads() -> None:
    v = committed()
    key = vodozemac.SessionKey(v["megolm"]["session_key_base64"])
    inbound = vodozemac.InboundGroupSession(key)
    assert inbound.session_id == v["megolm"]["session_id"]
    for index, (mm, m) in enumerate(zip(v["megolm"]["mm"], v["messages"], strict=True)):
        out = inbound.decrypt(vodozemac.MegolmMessage.from_bytes(bytes.fromhex(mm)))
        assert out.message_index == index and out.plaintext.hex() == m["payload"]
    late = vodozemac.InboundGroupSession.import_session(
        vodozemac.ExportedSessionKey(v["megolm"]["exported_at_1_base64"])
    )
    assert late.first_known_index == 1
    with pytest.raises(vodozemac.MegolmDecryptionException):
        late.decrypt(vodozemac.MegolmMessage.from_bytes(bytes.fromhex(v["megolm"]["mm"][0])))
    assert late.decrypt(vodozemac.MegolmMessage.from_bytes(bytes.fromhex(v["megolm"]["mm"][1])))


def test_the_library_opens_the_committed_share_and_messages() -> None:
    v = committed()
    i = v["inputs"]
    ed, curve = bytes.fromhex(v["ed25519"]), bytes.fromhex(i["curve25519_stand_in"])
    opened = env.OlmPlaintext(
        i["sender_user"], i["sender_device"], curve, bytes.fromhex(v["share_plaintext"])
    )
    share = env.open_share(
        opened,
        i["recipient_user"],
        i["recipient_device"],
        ed,
        curve,
        is_member=lambda c, u, d, e: (
            (c, u, d, e) == (i["channel"], i["sender_user"], i["sender_device"], 7)
        ),
    )
    assert (
        env.share_statement(
            share.channel,
            share.session_id,
            share.first_index,
            share.session_key,
            share.sender_user,
            share.sender_device,
            share.recipient_user,
            share.recipient_device,
            share.epoch,
            share.ts,
        ).hex()
        == v["share_signed"]
    )
    inbound, guard = env.InboundSessions(), env.ReplayGuard()
    assert inbound.add(share)
    for m, out in zip(i["messages"], v["messages"], strict=True):
        body = msgpack.unpackb(bytes.fromhex(out["body_msgpack"]), raw=False)
        env.server_verify_v2(body, i["channel"], i["sender_user"], m["client_msg_id"], ed)
        got = env.decrypt_v2(
            body, i["channel"], i["sender_user"], m["client_msg_id"], ed, inbound, guard
        )
        sth = None if m["sth"] is None else bytes.fromhex(m["sth"])
        assert (got.text, got.franking_key.hex(), got.ts, got.sth, got.verified, got.epoch) == (
            m["text"],
            m["franking_key"],
            m["ts"],
            sth,
            True,
            i["epoch"],
        )
        assert (
            env.message_statement(
                i["channel"],
                i["sender_user"],
                i["sender_device"],
                body["session"],
                body["index"],
                m["client_msg_id"],
                body["ts"],
                body["frank"],
                body["mm"],
            ).hex()
            == out["signed"]
        )
        assert env.payload_bytes(m["text"], got.franking_key, m["ts"], sth).hex() == out["payload"]


def test_what_the_library_sends_the_documented_steps_open() -> None:
    alice = device("alice", "a1")
    out = env.OutboundSession.new(CHANNEL, 2, now_ms=T0)
    key = out.session_key
    body = env.encrypt_v2(
        alice.account,
        out,
        CHANNEL,
        "alice",
        "c-1",
        "hey",
        now_ms=T0 + 1,
        fk=b"\1" * 32,
        sth=b"head",
    )
    inbound = vodozemac.InboundGroupSession(vodozemac.SessionKey(env.b64_encode(key)))
    payload = inbound.decrypt(vodozemac.MegolmMessage.from_bytes(body["mm"])).plaintext
    assert payload == pack({"text": "hey", "fk": b"\1" * 32, "ts": T0 + 1, "sth": b"head"})
    statement = pack(
        [
            "rt.v2.msg",
            CHANNEL,
            "alice",
            "a1",
            out.session_id,
            0,
            "c-1",
            T0 + 1,
            body["frank"],
            hashlib.sha256(body["mm"]).digest(),
        ]
    )
    wire.verify(alice.account.ed25519, statement, body["sig"], "bad")
    share = msgpack.unpackb(
        env.make_share(alice.account, out, "alice", "bob", "b1", now_ms=5), raw=False
    )
    assert share["statement"] == pack(
        [
            "rt.v2.share",
            CHANNEL,
            out.session_id,
            1,
            out.session_key,
            "alice",
            "a1",
            "bob",
            "b1",
            2,
            5,
        ]
    )
    wire.verify(alice.account.ed25519, share["statement"], share["sig"], "bad")


if __name__ == "__main__":
    json.dump(make(INPUTS, record(INPUTS)), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
