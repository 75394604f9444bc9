"""The client side of end-to-end encryption (docs/protocol-v1.md section 5), on PyNaCl.

- `DeviceKeys`: a device's X25519 identity key (key agreement: sealed boxes) and Ed25519 signing
  key, saved encrypted at rest under a passphrase (Argon2id -> XSalsa20-Poly1305 SecretBox).
- `seal_key` / `open_key`: a channel key in a sealed box to one device's identity key.
- `encrypt` / `decrypt`: XChaCha20-Poly1305 with associated data binding the channel, sender
  device, `client_msg_id`, key id and franking commitment, plus the detached Ed25519 signature of
  the protocol; a ciphertext moved to another channel or id, or altered, does not open.
- Franking: the plaintext carries a fresh franking key `fk`; the envelope carries the commitment
  `frank = HMAC-SHA256(fk, text)`. A recipient checks the commitment when decrypting and can
  later reveal (text, fk) in a report; the server checks it against what it stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any

import msgpack
import nacl.bindings as sodium
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

ALG = "xchacha20poly1305"
NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
KEY_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
_KEYFILE_MAGIC = b"rt-device-keys-v1"


class CryptoError(Exception):
    """A message or key that does not verify or open; `reason` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def pack(value: Any) -> bytes:
    """msgpack with bin for bytes and str for text: the encoding every statement of v1 and
    v2 is signed or hashed in (one place, so that every module encodes alike)."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def device_statement(user: str, device: str, identity_key: bytes) -> bytes:
    """What `keys.register`'s `sig` signs (docs/protocol-v1.md section 5)."""
    return pack(["rt.v1.device", user, device, identity_key])


def message_statement(
    channel: str, device: str, client_msg_id: str, key_id: str, nonce: bytes, ct: bytes
) -> bytes:
    """What an envelope's `sig` signs (docs/protocol-v1.md section 5)."""
    return pack(["rt.v1.msg", channel, device, client_msg_id, key_id, nonce, ct])


def _associated_data(
    channel: str, device: str, client_msg_id: str, key_id: str, frank: bytes
) -> bytes:
    return pack(["rt.v1.ad", channel, device, client_msg_id, key_id, frank])


def frank_commitment(franking_key: bytes, text: str) -> bytes:
    return hmac.new(franking_key, text.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class DeviceKeys:
    device: str
    identity: PrivateKey
    signing: SigningKey

    @classmethod
    def generate(cls, device: str | None = None) -> DeviceKeys:
        """New keys for a device. Without `device`, a random id (`d-` and 22 URL-safe
        characters): ids are scoped per user, but a guessable one tells others which device
        is which; pass one only to keep an id the app already has."""
        if device is None:
            device = f"d-{secrets.token_urlsafe(16)}"
        return cls(device, PrivateKey.generate(), SigningKey.generate())

    @property
    def identity_public(self) -> bytes:
        return bytes(self.identity.public_key)

    @property
    def signing_public(self) -> bytes:
        return bytes(self.signing.verify_key)

    def registration(self, user: str) -> dict[str, Any]:
        """The arguments of `keys.register` for this device."""
        sig = self.signing.sign(device_statement(user, self.device, self.identity_public))
        return {
            "device": self.device,
            "identity_key": self.identity_public,
            "signing_key": self.signing_public,
            "sig": sig.signature,
        }

    def save(
        self,
        passphrase: str,
        *,
        opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
        memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
    ) -> bytes:
        """The private keys, encrypted under a key derived from `passphrase` (Argon2id)."""
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        key = nacl.pwhash.argon2id.kdf(
            nacl.secret.SecretBox.KEY_SIZE,
            passphrase.encode(),
            salt,
            opslimit=opslimit,
            memlimit=memlimit,
        )
        secret = pack(
            {
                "device": self.device,
                "identity": bytes(self.identity),
                "signing": bytes(self.signing),
            }
        )
        box = nacl.secret.SecretBox(key).encrypt(secret)
        return pack(
            {
                "magic": _KEYFILE_MAGIC,
                "salt": salt,
                "ops": opslimit,
                "mem": memlimit,
                "box": bytes(box),
            }
        )

    @classmethod
    def load(cls, data: bytes, passphrase: str) -> DeviceKeys:
        try:
            outer = msgpack.unpackb(data, raw=False)
            if outer.get("magic") != _KEYFILE_MAGIC:
                raise CryptoError("not a device key file")
            key = nacl.pwhash.argon2id.kdf(
                nacl.secret.SecretBox.KEY_SIZE,
                passphrase.encode(),
                outer["salt"],
                opslimit=outer["ops"],
                memlimit=outer["mem"],
            )
            inner = msgpack.unpackb(nacl.secret.SecretBox(key).decrypt(outer["box"]), raw=False)
        except nacl.exceptions.CryptoError:
            raise CryptoError("wrong passphrase or damaged key file") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CryptoError(f"not a device key file: {exc}") from None
        return cls(inner["device"], PrivateKey(inner["identity"]), SigningKey(inner["signing"]))


def new_channel_key() -> bytes:
    return nacl.utils.random(KEY_BYTES)


def seal_key(channel_key: bytes, identity_key: bytes) -> bytes:
    """A channel key for one device, readable only with that device's identity private key."""
    return bytes(SealedBox(PublicKey(identity_key)).encrypt(channel_key))


def open_key(sealed: bytes, keys: DeviceKeys) -> bytes:
    try:
        key = SealedBox(keys.identity).decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise CryptoError("sealed key is not for this device") from None
    if len(key) != KEY_BYTES:
        raise CryptoError("sealed key has the wrong size")
    return key


@dataclass(frozen=True)
class Plaintext:
    text: str
    franking_key: bytes  # reveal with the text in a report


def encrypt(
    keys: DeviceKeys, channel: str, client_msg_id: str, key_id: str, channel_key: bytes, text: str
) -> dict[str, Any]:
    """An envelope for `publish`: encrypted, franked, signed."""
    franking_key = os.urandom(32)
    frank = frank_commitment(franking_key, text)
    nonce = os.urandom(NONCE_BYTES)
    payload = pack({"text": text, "fk": franking_key})
    ad = _associated_data(channel, keys.device, client_msg_id, key_id, frank)
    ct = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(payload, ad, nonce, channel_key)
    sig = keys.signing.sign(
        message_statement(channel, keys.device, client_msg_id, key_id, nonce, ct)
    ).signature
    return {
        "v": 1,
        "alg": ALG,
        "device": keys.device,
        "key_id": key_id,
        "nonce": nonce,
        "ct": ct,
        "sig": sig,
        "frank": frank,
    }


def verify_signature(
    body: dict[str, Any], channel: str, client_msg_id: str, signing_key: bytes
) -> None:
    statement = message_statement(
        channel, body["device"], client_msg_id, body["key_id"], body["nonce"], body["ct"]
    )
    try:
        VerifyKey(signing_key).verify(statement, body["sig"])
    except nacl.exceptions.BadSignatureError:
        raise CryptoError("bad signature") from None


def decrypt(
    body: dict[str, Any], channel: str, client_msg_id: str, channel_key: bytes, signing_key: bytes
) -> Plaintext:
    """Verify the sender's signature, open the ciphertext and check the franking commitment."""
    verify_signature(body, channel, client_msg_id, signing_key)
    frank = body.get("frank", b"")
    ad = _associated_data(channel, body["device"], client_msg_id, body["key_id"], frank)
    try:
        payload = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            body["ct"], ad, body["nonce"], channel_key
        )
    except nacl.exceptions.CryptoError:
        raise CryptoError("ciphertext does not open: altered, moved or wrong key") from None
    inner = msgpack.unpackb(payload, raw=False)
    text, franking_key = inner["text"], inner["fk"]
    if not hmac.compare_digest(frank_commitment(franking_key, text), frank):
        raise CryptoError("franking commitment does not match the plaintext")
    return Plaintext(text, franking_key)
