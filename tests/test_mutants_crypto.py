"""Gaps found by mutation testing (scripts/mutate crypto): signatures that must be checked, the
key directory's bounds, who may fetch a channel key, when a key was shared, the server's
franking tag as recorded, and what the receiving client reads, reports and closes. A real
server process where the server decides; the client library's own code in process where only
it decides."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Node, running_node, token
from nacl.signing import SigningKey
from wire import Raw, b64, until

from realtime_safety.crypto.client import SecureClient
from realtime_safety.crypto.directory import MAX_LOOKUP_USERS, server_tag
from realtime_safety.crypto.e2ee import CryptoError, DeviceKeys, decrypt, encrypt, new_channel_key
from realtime_safety.storage.sqlite import SqliteStore


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from running_node(tmp_path_factory.mktemp("mutants-crypto"), "mutants-crypto")


async def test_a_device_whose_registration_signature_does_not_verify_is_refused(
    node: Node,
) -> None:
    """`keys.register` checks `sig` against `signing_key` even for a device nobody holds yet
    (mutant: crypto/directory.py, the `VerifyKey(signing).verify(...)` line removed)."""
    user = f"ann-{uuid.uuid4().hex[:6]}"
    keys = DeviceKeys.generate(f"phone-{uuid.uuid4().hex[:6]}")
    raw = await Raw.open(node.url, token(user, device=keys.device))
    forged = {**keys.registration(user), "sig": bytes(64)}
    reply = await raw.cmd("keys.register", **b64(forged))
    assert reply["error"]["code"] == "forbidden"
    signed_by_another = {
        **keys.registration(user),
        "sig": DeviceKeys.generate("x").registration(user)["sig"],
    }
    reply = await raw.cmd("keys.register", **b64(signed_by_another))
    assert reply["error"]["code"] == "forbidden"
    # nothing was stored: the genuine registration still succeeds, and is then listed
    await raw.ok("keys.register", **b64(keys.registration(user)))
    devices = (await raw.ok("keys.lookup", users=[user]))["devices"]
    assert [d["device"] for d in devices] == [keys.device]
    await raw.close()


async def test_keys_lookup_takes_1_to_max_users_of_1_to_128_characters(node: Node) -> None:
    """Lookups of 1 and of MAX_LOOKUP_USERS users, and user ids at both ends of 1-128
    characters (mutants: crypto/directory.py, `1 <= len(users) <= MAX_LOOKUP_USERS` and
    `1 <= len(u) <= 128` with `<`)."""
    raw = await Raw.open(node.url, token(f"ann-{uuid.uuid4().hex[:6]}"))
    most = [f"nobody{i}" for i in range(MAX_LOOKUP_USERS)]
    for users in (["a"], ["b" * 128], ["a", "b" * 128], most):
        assert (await raw.ok("keys.lookup", users=users))["devices"] == []
    for bad in ([], [""], ["b" * 129], [*most, "one-more"]):
        assert await raw.error("keys.lookup", users=bad) == "bad_request"
    await raw.close()


def test_a_message_not_signed_by_its_sender_device_does_not_open() -> None:
    """A member holding the channel key can encrypt, but cannot sign as another member's
    device: decrypt refuses a body whose `sig` does not verify, although its ciphertext opens
    (mutant: crypto/e2ee.py, `verify_signature(...)` removed from `decrypt`)."""
    victim, forger = DeviceKeys.generate("victim-phone"), DeviceKeys.generate("forger-phone")
    key = new_channel_key()
    genuine = encrypt(victim, "room:r", "m1", "k1", key, "hello")
    assert decrypt(genuine, "room:r", "m1", key, victim.signing_public).text == "hello"
    forged = encrypt(forger, "room:r", "m1", "k1", key, "send money")
    forged["device"] = victim.device  # claims to come from the victim's phone
    with pytest.raises(CryptoError, match="bad signature"):
        decrypt(forged, "room:r", "m1", key, victim.signing_public)
    unsigned = {**genuine, "sig": bytes(64)}
    with pytest.raises(CryptoError, match="bad signature"):
        decrypt(unsigned, "room:r", "m1", key, victim.signing_public)


def push(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "push": "message",
        "channel": "public:lobby",
        "seq": 7,
        "from": {"user": "ann", "device": None},
        "client_msg_id": "m7",
        "body": body,
    }


async def test_the_client_reads_plaintext_and_names_an_unknown_algorithm() -> None:
    """`SecureClient.open` never raises for a message: a plaintext body gives its text, an
    unknown algorithm gives an error naming it (mutants: crypto/client.py, `body.get("text")`
    with another key, and `return Decrypted(..., error="unknown algorithm …")` → None)."""
    chat = SecureClient("ws://127.0.0.1:9/ws", "unused", "bob", DeviceKeys.generate("bob-1"))
    plain = await chat.open(push({"v": 1, "alg": "none", "text": "hi all"}))
    assert (plain.text, plain.error, plain.seq, plain.user) == ("hi all", None, 7, "ann")
    odd = await chat.open(push({"v": 1, "alg": "rot13", "ct": b"uryyb"}))
    assert odd.text is None and odd.error == "unknown algorithm 'rot13'"


# An envelope recorded from this client library (channel key bytes 0..31, signing key seed
# 0x09 * 32): the format other clients and stored history depend on.
KNOWN_ENVELOPE = {
    "v": 1,
    "alg": "xchacha20poly1305",
    "device": "kat-phone",
    "key_id": "k1",
    "nonce": bytes.fromhex("3f84dc9f1c2cd635ae415960780c301c54dc5cea3d83a6b1"),
    "ct": bytes.fromhex(
        "fe6f69051b8c9fce6e8891573d58dd8533080fbd15e6a4bf611aad57977d43aed1a448b7f3bf22f5"
        "c5adfffea6e0dd896d2aae816cb99d77415b9ded76d5e814542a745d403c3e68"
    ),
    "sig": bytes.fromhex(
        "6a142c87fc66dccce3758c0a75e2aafd1a1ed094394ea2794b884ea1566007008abe239412772b83"
        "6b6d4545779f0e4b875d411d19e1f2ed46c9d5f116098303"
    ),
    "frank": bytes.fromhex("0e4f1c1c0c2de5297e91113eaf5fce61d3e0a492055c0620bfc0aff0fcb7d1e0"),
}


def test_a_recorded_envelope_still_opens() -> None:
    """Known answer: an envelope encrypted earlier (stored history, another client) opens with
    today's code, so the associated data, the payload layout and the franking commitment have
    not changed (mutant: crypto/e2ee.py, the associated data's "rt.v1.ad" label changed)."""
    signing = SigningKey(bytes([9]) * 32)
    plain = decrypt(
        KNOWN_ENVELOPE, "room:kat", "m-kat", bytes(range(32)), bytes(signing.verify_key)
    )
    assert plain.text == "known answer"
    with pytest.raises(CryptoError):  # bound to its channel
        decrypt(KNOWN_ENVELOPE, "room:other", "m-kat", bytes(range(32)), bytes(signing.verify_key))


async def member_with_device(node: Node, room: str, user: str) -> tuple[Raw, str]:
    """A member of `room` with a registered device, connected with that device's token."""
    node.add_member(room, user)
    keys = DeviceKeys.generate(f"{user}-{uuid.uuid4().hex[:6]}")
    raw = await Raw.open(node.url, token(user, device=keys.device))
    await raw.ok("keys.register", **b64(keys.registration(user)))
    return raw, keys.device


async def test_a_removed_member_can_no_longer_fetch_the_room_keys(node: Node) -> None:
    """keys.fetch checks the caller's access to the channel on every call: once removed from a
    room, a member cannot fetch its keys any more, not even those sealed to their device while
    they were a member (mutant: crypto/ops.py, the `Action.HISTORY` check removed from
    `fetch`)."""
    room = f"room:{uuid.uuid4().hex[:8]}"
    ann, ann_device = await member_with_device(node, room, "ann")
    bob, bob_device = await member_with_device(node, room, "bob")
    try:
        sealed = {"ann": {ann_device: os.urandom(80)}, "bob": {bob_device: os.urandom(80)}}
        await ann.ok("keys.share", channel=room, key_id="k1", sealed=b64(sealed))
        fetched = await bob.ok("keys.fetch", channel=room, key_id="k1")
        assert (fetched["key_id"], fetched["sealed"]) == ("k1", b64(sealed["bob"][bob_device]))
        assert node.api("DELETE", f"/v1/channels/{room}/members/bob").status_code == 204

        async def refused() -> bool:
            return await bob.error("keys.fetch", channel=room, key_id="k1") == "forbidden"

        await until(refused, what="the removed member's fetch refused")
        assert await bob.error("keys.fetch", channel=room) == "forbidden"  # the newest, too
        assert (await ann.ok("keys.fetch", channel=room))["key_id"] == "k1"
    finally:
        await ann.close()
        await bob.close()


async def test_a_shared_key_records_when_it_was_shared_in_milliseconds(node: Node) -> None:
    """A sealed key is stored with the time it was shared, in milliseconds since the epoch
    like every timestamp of the store (`realtime export` writes it) (mutant: crypto/ops.py,
    `int(time.time() * 1000)` with another factor)."""
    room = f"room:{uuid.uuid4().hex[:8]}"
    ann, device = await member_with_device(node, room, "ann")
    try:
        before = int(time.time() * 1000)
        await ann.ok(
            "keys.share", channel=room, key_id="k1", sealed=b64({"ann": {device: bytes(64)}})
        )
        after = int(time.time() * 1000)
    finally:
        await ann.close()
    store = SqliteStore(Path(node.env["RT_DATA_DIR"]))  # the node's own store, read alongside
    await store.open()
    try:
        shared = [r async for r in store.dump("channel_keys") if r["channel"] == room]
    finally:
        await store.close()
    assert [(r["user"], r["device"], r["key_id"], r["from_device"]) for r in shared] == [
        ("ann", device, "k1", device)
    ]
    assert before <= shared[0]["ts"] <= after


async def test_a_secure_client_used_as_a_context_manager_closes_its_connection(
    node: Node,
) -> None:
    """`async with SecureClient(...)` connects and registers the device on entry and closes
    the connection on exit: the server sees it go (mutant: crypto/client.py, `__aexit__`
    without `await self.client.close()`)."""
    await until(lambda: asyncio.to_thread(lambda: node.connections() == 0), what="no connection")
    keys = DeviceKeys.generate(f"cm-{uuid.uuid4().hex[:6]}")
    async with SecureClient(node.url, token("cm", device=keys.device), "cm", keys) as chat:
        assert chat.keys is keys
        assert await asyncio.to_thread(node.connections) == 1
    await until(
        lambda: asyncio.to_thread(lambda: node.connections() == 0), what="the connection closed"
    )


def test_a_recorded_franking_tag_still_verifies() -> None:
    """Known answer: the server's franking tag (`ftag`, stored with each franked message) for
    a fixed franking key, commitment, channel, sender and time is what it was when recorded,
    so reports on messages stored before an upgrade still verify (mutant:
    crypto/directory.py, the tag's msgpack input packed with `use_bin_type=False`). Recorded
    from this code: HMAC-SHA256 under the key over msgpack ["rt.v1.ftag", frank, channel,
    user, ts] with bytes as bin."""
    tag = server_tag(bytes(range(32)), bytes([7]) * 32, "room:kat", "ann", 1_700_000_000_000)
    assert tag.hex() == "ba16235699861c74c66639758af3d736b6885d06b75c08eace0beecc2a9e50d6"


def frames_in(node: Node) -> float:
    """Frames the node has received from clients (its `rt_frames_in_total`)."""
    for line in httpx.get(node.http + "/metrics", timeout=10).text.splitlines():
        if line.startswith("rt_frames_in_total "):
            return float(line.split()[1])
    raise AssertionError("no rt_frames_in_total in /metrics")


async def test_history_under_an_earlier_key_opens_on_a_device_that_never_cached_it(
    node: Node,
) -> None:
    """A device that did not keep its channel keys (an app restarted) reads history written
    under two keys: each message asks the server for the key it names, not the newest one,
    and each key (and the sender's signing key) is fetched once, not once per message
    (mutants: crypto/client.py, `keys.fetch` sent without the message's `key_id`; the key
    cache never used)."""
    room = f"room:{uuid.uuid4().hex[:8]}"
    node.add_member(room, "ann")
    node.add_member(room, "bob")
    ann_keys = DeviceKeys.generate(f"ann-{uuid.uuid4().hex[:6]}")
    bob_keys = DeviceKeys.generate(f"bob-{uuid.uuid4().hex[:6]}")
    async with (
        SecureClient(node.url, token("ann", device=ann_keys.device), "ann", ann_keys) as ann,
        SecureClient(node.url, token("bob", device=bob_keys.device), "bob", bob_keys),
    ):
        await ann.send(room, "first key, one")
        await ann.send(room, "first key, two")
        first = ann._current[room]
        assert await ann.rotate(room) != first
        await ann.send(room, "second key, one")
        await ann.send(room, "second key, two")
    async with SecureClient(node.url, token("bob", device=bob_keys.device), "bob", bob_keys) as bob:
        history = await bob.client.request("history", channel=room)
        before = await asyncio.to_thread(frames_in, node)
        opened = [await bob.open(m) for m in history["messages"]]
        requests = await asyncio.to_thread(frames_in, node) - before
    assert [(m.text, m.error) for m in opened] == [
        ("first key, one", None),
        ("first key, two", None),
        ("second key, one", None),
        ("second key, two", None),
    ]
    assert requests == 3  # keys.fetch of each key, keys.lookup of ann's signing key
