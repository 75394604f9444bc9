"""Committed test vectors for the bytes of docs/protocol-v1.md section 5 (an envelope and a
device registration), so that another client library can check itself against them.

`make()` follows the documented steps with libsodium and msgpack alone (not this project's
crypto code); the tests check that the committed file is what those steps give, and that the
project's client library (crypto/e2ee.py) opens, verifies and would have produced the same.
Regenerate (only when the protocol changes, which v1 never does):
`python tests/test_vectors.py > tests/vectors/envelope-v1.json`."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
from nacl import bindings as sodium
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from realtime_safety.crypto import e2ee

FILE = Path(__file__).parent / "vectors" / "envelope-v1.json"

INPUTS = {
    "user": "alice",
    "device": "alice-phone-7f3a",
    "channel": "room:climbing-club",
    "client_msg_id": "0b2c9a1e-msg-1",
    "key_id": "k1",
    "text": "see you at the wall at 7 ✓",
    "channel_key": bytes(range(32)).hex(),
    "franking_key": bytes(range(100, 132)).hex(),
    "nonce": bytes(range(200, 224)).hex(),
    "signing_seed": bytes(range(50, 82)).hex(),
    "identity_secret": bytes(range(150, 182)).hex(),
}


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def make(i: dict[str, str]) -> dict[str, Any]:
    fk, key, nonce = (bytes.fromhex(i[k]) for k in ("franking_key", "channel_key", "nonce"))
    signing = SigningKey(bytes.fromhex(i["signing_seed"]))
    identity_public = bytes(PrivateKey(bytes.fromhex(i["identity_secret"])).public_key)
    frank = hmac.new(fk, i["text"].encode(), hashlib.sha256).digest()
    payload = pack({"text": i["text"], "fk": fk})
    ad = pack(["rt.v1.ad", i["channel"], i["device"], i["client_msg_id"], i["key_id"], frank])
    ct = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(payload, ad, nonce, key)
    statement = pack(
        ["rt.v1.msg", i["channel"], i["device"], i["client_msg_id"], i["key_id"], nonce, ct]
    )
    registration = pack(["rt.v1.device", i["user"], i["device"], identity_public])
    return {
        "inputs": i,
        "frank": frank.hex(),
        "payload": payload.hex(),
        "ad": ad.hex(),
        "ct": ct.hex(),
        "signed": statement.hex(),
        "sig": signing.sign(statement).signature.hex(),
        "signing_key": bytes(signing.verify_key).hex(),
        "identity_key": identity_public.hex(),
        "registration_signed": registration.hex(),
        "registration_sig": signing.sign(registration).signature.hex(),
    }


def committed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FILE.read_text())
    return data


def test_the_committed_vector_is_what_the_documented_steps_give() -> None:
    assert committed() == make(INPUTS)


def test_the_client_library_opens_and_verifies_the_vector() -> None:
    v = committed()
    i = v["inputs"]
    body = {
        "v": 1,
        "alg": "xchacha20poly1305",
        "device": i["device"],
        "key_id": i["key_id"],
        "nonce": bytes.fromhex(i["nonce"]),
        "ct": bytes.fromhex(v["ct"]),
        "sig": bytes.fromhex(v["sig"]),
        "frank": bytes.fromhex(v["frank"]),
    }
    key, signing_key = bytes.fromhex(i["channel_key"]), bytes.fromhex(v["signing_key"])
    opened = e2ee.decrypt(body, i["channel"], i["client_msg_id"], key, signing_key)
    assert opened.text == i["text"] and opened.franking_key.hex() == i["franking_key"]
    # the library's statements are the documented ones, byte for byte
    assert e2ee.message_statement(
        i["channel"], i["device"], i["client_msg_id"], i["key_id"], body["nonce"], body["ct"]
    ) == bytes.fromhex(v["signed"])
    identity_key = bytes.fromhex(v["identity_key"])
    statement = e2ee.device_statement(i["user"], i["device"], identity_key)
    assert statement == bytes.fromhex(v["registration_signed"])
    VerifyKey(signing_key).verify(statement, bytes.fromhex(v["registration_sig"]))
    # and what the library encrypts, the documented steps open
    mine = e2ee.encrypt(
        e2ee.DeviceKeys(i["device"], PrivateKey.generate(), SigningKey.generate()),
        i["channel"], i["client_msg_id"], i["key_id"], key, i["text"],
    )  # fmt: skip
    ad = pack(["rt.v1.ad", i["channel"], i["device"], i["client_msg_id"], i["key_id"],
               mine["frank"]])  # fmt: skip
    payload = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(mine["ct"], ad, mine["nonce"], key)
    assert msgpack.unpackb(payload, raw=False)["text"] == i["text"]


if __name__ == "__main__":
    json.dump(make(INPUTS), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
