"""End-to-end encryption through a real server process (docs/protocol-v1.md sections 5 and 8)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Node, running_node, token
from wire import AppDevice, Raw, b64

from realtime_safety.crypto.client import Decrypted, SecureClient
from realtime_safety.crypto.e2ee import DeviceKeys, encrypt, new_channel_key


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from running_node(tmp_path_factory.mktemp("e2ee"), "e2ee")


def room(n: Node, *users: str) -> str:
    name = f"room:{uuid.uuid4().hex[:8]}"
    for u in users:
        n.add_member(name, u)
    return name


def dev(name: str) -> DeviceKeys:
    return DeviceKeys.generate(f"{name}-{uuid.uuid4().hex[:6]}")


async def next_message(chat: SecureClient, timeout: float = 5) -> Decrypted:
    it = chat.messages()
    async with asyncio.timeout(timeout):
        return await anext(it)


async def secure(n: Node, user: str, keys: DeviceKeys) -> SecureClient:
    chat = SecureClient(n.url, token(user, device=keys.device), user, keys)
    await chat.start()
    return chat


@pytest.fixture
async def chats(node: Node) -> AsyncIterator[list[SecureClient]]:
    opened: list[SecureClient] = []
    yield opened
    for c in opened:
        await c.client.close()


async def test_two_users_three_devices_round_trip(node: Node, chats: list[SecureClient]) -> None:
    ch = room(node, "alice", "bob")
    alice_phone = await secure(node, "alice", dev("alice-phone"))
    alice_laptop = await secure(node, "alice", dev("alice-laptop"))
    bob = await secure(node, "bob", dev("bob-phone"))
    chats += [alice_phone, alice_laptop, bob]
    for c in chats:
        await c.subscribe(ch)
    await alice_phone.send(ch, "meet at noon")
    for reader in (bob, alice_laptop, alice_phone):
        got = await next_message(reader)
        assert (got.text, got.user, got.error) == ("meet at noon", "alice", None)
        assert got.device == alice_phone.keys.device
    await bob.send(ch, "ok!")  # bob uses the key alice shared
    assert (await next_message(alice_laptop)).text == "ok!"


async def test_a_removed_member_cannot_read_later_messages(
    node: Node, chats: list[SecureClient]
) -> None:
    ch = room(node, "alice", "bob", "carol")
    alice = await secure(node, "alice", dev("alice"))
    bob = await secure(node, "bob", dev("bob"))
    carol = await secure(node, "carol", dev("carol"))
    chats += [alice, bob, carol]
    for c in chats:
        await c.subscribe(ch)
    await alice.send(ch, "before")
    for c in chats:
        assert (await next_message(c)).text == "before"
    old_key_id = alice._current[ch]
    assert node.api("DELETE", f"/v1/channels/{ch}/members/carol").status_code == 204
    push = await alice.client.next_push(5)
    assert push == {"push": "rekey", "channel": ch}
    assert await alice.handle(push) is None  # as messages() would
    await alice.send(ch, "after")
    assert alice._current[ch] != old_key_id  # rotated before the next message
    assert (await next_message(bob)).text == "after"
    # carol's device is gone from the room: no new key for it, and the ciphertext stays shut
    assert node.api("GET", f"/v1/channels/{ch}/messages").status_code == 200
    stored = node.api("GET", f"/v1/channels/{ch}/messages").json()["messages"][-1]
    assert stored["body"]["key_id"] == alice._current[ch]
    carol_view = await carol.open({**stored, "body": _unb64(stored["body"])})
    assert carol_view.text is None and "no key" in (carol_view.error or "")


def _unb64(body: dict[str, Any]) -> dict[str, Any]:
    import base64

    out = dict(body)
    for k in ("nonce", "ct", "sig", "frank", "ftag"):
        if k in out:
            out[k] = base64.b64decode(out[k])
    return out


async def test_tampering_is_refused_with_a_specific_error(node: Node) -> None:
    ch = room(node, "alice", "mallory")
    other = room(node, "alice", "mallory")
    alice = await Raw.open(node.url, token("alice"))
    mallory = await Raw.open(node.url, token("mallory"))
    phone = AppDevice(f"alice-{uuid.uuid4().hex[:6]}")
    await phone.register(alice, "alice")
    good = phone.envelope(ch, "m1", json=False)

    async def refused(raw: Raw, channel: str, cmid: str, body: dict[str, Any]) -> str:
        reply = await raw.cmd("publish", channel=channel, client_msg_id=cmid, body=b64(body))
        assert reply["ok"] is False
        return f"{reply['error']['code']}: {reply['error']['message']}"

    flipped = dict(good, ct=bytes([good["ct"][0] ^ 1]) + good["ct"][1:])
    assert await refused(alice, ch, "m1", flipped) == (
        "forbidden: envelope signature does not verify"
    )
    assert await refused(alice, other, "m1", good) == (
        "forbidden: envelope signature does not verify"
    )  # swapped channel
    assert await refused(alice, ch, "m2", good) == (
        "forbidden: envelope signature does not verify"
    )  # replayed under another id
    forged = dict(good, sig=os.urandom(64))
    assert await refused(alice, ch, "m1", forged) == (
        "forbidden: envelope signature does not verify"
    )
    assert await refused(mallory, ch, "m1", good) == (
        f"forbidden: device '{phone.keys.device}' is not registered to the sender"
    )
    unknown = AppDevice("never-registered").envelope(ch, "m1", json=False)
    assert await refused(alice, ch, "m1", unknown) == (
        "forbidden: device 'never-registered' is not registered to the sender"
    )
    assert (await alice.ok("publish", channel=ch, client_msg_id="m1", body=b64(good)))["seq"] == 1
    # the key directory: device ids are per user, a device's keys never change
    thief = DeviceKeys(
        phone.keys.device, DeviceKeys.generate("x").identity, DeviceKeys.generate("x").signing
    )
    reply = await mallory.cmd("keys.register", **b64(thief.registration("alice")))
    assert reply["error"]["code"] == "forbidden"  # signed over "alice", sent by "mallory"
    # mallory may name her own device the same: it is hers, and alice's stays alice's
    await mallory.ok("keys.register", **b64(thief.registration("mallory")))
    assert await refused(mallory, ch, "m1", good) == (
        "forbidden: envelope signature does not verify"
    )
    rekeyed = DeviceKeys(phone.keys.device, DeviceKeys.generate("y").identity, phone.keys.signing)
    reply = await alice.cmd("keys.register", **b64(rekeyed.registration("alice")))
    assert reply["error"]["code"] == "conflict"
    await alice.close()
    await mallory.close()


async def test_the_receiving_client_surfaces_what_it_cannot_read(
    node: Node, chats: list[SecureClient]
) -> None:
    ch = room(node, "alice", "bob")
    alice = await secure(node, "alice", dev("alice"))
    bob = await secure(node, "bob", dev("bob"))
    chats += [alice, bob]
    await bob.subscribe(ch)
    # a key alice never shared: bob gets the message, marked, not dropped
    secret_key = new_channel_key()
    body = encrypt(alice.keys, ch, "lost", "private-key-id", secret_key, "you can't read this")
    await alice.client.publish(ch, body, client_msg_id="lost")
    got = await next_message(bob)
    assert got.text is None and got.seq == 1 and "no key" in (got.error or "")
    # a commitment that does not match the plaintext is caught by the receiver
    await alice.send(ch, "fine")
    assert (await next_message(bob)).text == "fine"
    key_id = alice._current[ch]
    key = alice._channel_keys[ch][key_id]
    bad = encrypt(alice.keys, ch, "badfrank", key_id, key, "real text")
    bad["frank"] = os.urandom(32)  # the AD binds frank: the ciphertext no longer opens
    await alice.client.publish(ch, bad, client_msg_id="badfrank")
    got = await next_message(bob)
    assert got.text is None and got.error == "ciphertext does not open: altered, moved or wrong key"


async def test_stored_history_holds_no_plaintext(node: Node, chats: list[SecureClient]) -> None:
    ch = room(node, "alice", "bob")
    alice = await secure(node, "alice", dev("alice"))
    chats.append(alice)
    marker = f"plaintext-marker-{uuid.uuid4().hex}"
    for i in range(3):
        await alice.send(ch, f"{marker} {i}")
    data_dir = Path(node.env["RT_DATA_DIR"])
    raw_bytes = b"".join(p.read_bytes() for p in data_dir.glob("realtime.sqlite3*"))
    assert marker.encode() not in raw_bytes
    db = sqlite3.connect(data_dir / "realtime.sqlite3")
    rows = db.execute("SELECT body FROM messages WHERE channel=?", (ch,)).fetchall()
    db.close()
    assert len(rows) == 3 and all(marker.encode() not in r[0] for r in rows)


async def test_franking_reports(node: Node, chats: list[SecureClient]) -> None:
    ch = room(node, "alice", "bob")
    alice = await secure(node, "alice", dev("alice"))
    bob = await secure(node, "bob", dev("bob"))
    chats += [alice, bob]
    await bob.subscribe(ch)
    await alice.send(ch, "you are an idiot")
    abuse = await next_message(bob)
    assert abuse.text == "you are an idiot"
    reply = await bob.report(abuse, "insult")
    assert reply["verified"] is True
    # altered plaintext: refused (nobody can frame alice with words she did not send)
    altered = Decrypted(**{**abuse.__dict__, "text": "give me your password"})
    with pytest.raises(Exception, match="franking opening does not match"):
        await bob.report(altered, "phishing")
    forged = Decrypted(**{**abuse.__dict__, "franking_key": os.urandom(32)})
    with pytest.raises(Exception, match="franking opening does not match"):
        await bob.report(forged, "insult")
    # without franking the report is kept, unverified
    plain = Decrypted(**{**abuse.__dict__, "text": None, "franking_key": None})
    assert (await bob.report(plain, "insult"))["verified"] is False
    db = sqlite3.connect(Path(node.env["RT_DATA_DIR"]) / "realtime.sqlite3")
    rows = db.execute(
        "SELECT reporter, sender, text, verified FROM reports WHERE channel=?", (ch,)
    ).fetchall()
    db.close()
    assert sorted(rows, key=lambda r: r[3]) == [
        ("bob", "alice", None, 0),
        ("bob", "alice", "you are an idiot", 1),
    ]


async def test_device_keys_at_rest_need_the_passphrase() -> None:
    keys = DeviceKeys.generate("phone")
    blob = keys.save("correct horse", opslimit=2, memlimit=8 * 1024 * 1024)
    assert bytes(keys.identity) not in blob and bytes(keys.signing) not in blob
    again = DeviceKeys.load(blob, "correct horse")
    assert again.identity_public == keys.identity_public
    assert again.signing_public == keys.signing_public
    from realtime_safety.crypto.e2ee import CryptoError

    with pytest.raises(CryptoError, match="wrong passphrase"):
        DeviceKeys.load(blob, "wrong")
