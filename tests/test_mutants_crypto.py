"""Gaps found by mutation testing (scripts/mutate crypto): signatures that must be checked, the
key directory's bounds, and what the receiving client reports. A real server process where the
server decides; the client library's own code in process where only it decides."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Node, base_env, token
from wire import Raw, b64

from crypto.client import SecureClient
from crypto.directory import MAX_LOOKUP_USERS
from crypto.e2ee import CryptoError, DeviceKeys, decrypt, encrypt, new_channel_key


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(base_env(tmp_path_factory.mktemp("mutants-crypto")), "mutants-crypto")
    n.start()
    yield n
    n.stop()


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
