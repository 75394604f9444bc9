"""A device's Olm account and its pairwise Olm channels (E2EE v2, docs/e2ee/messages.md).

`DeviceAccount` wraps vodozemac's `Account`: the device's Ed25519 key (signs our statements)
and Curve25519 key (its Olm identity), one-time keys, and a passphrase-encrypted save file.
`Olm` keeps the device's Olm sessions per peer (user, device); v2 uses Olm for one thing only,
carrying key shares (crypto/envelope_megolm.py) to one device at a time."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils
import vodozemac

from . import envelope_wire as w
from .e2ee import CryptoError, pack
from .envelope_wire import KEY_BYTES, MAX_ID_CHARS, MAX_OLM_SESSIONS_PER_DEVICE

ACCOUNT_MAGIC = b"rt-device-account-v2"


def _derive(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    key: bytes = nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(), salt, opslimit=opslimit,
        memlimit=memlimit,
    )  # fmt: skip
    return key


class DeviceAccount:
    """One device's Olm account: its long-term Ed25519 (signing) and Curve25519 (Olm identity)
    keys and its one-time keys, plus `store_key`, a random 32-byte key that pickles this
    device's session stores (`Olm`, `InboundSessions`, `OutboundSession`) without running
    Argon2id again. Mutated by Olm (a one-time key is used up when a session is received):
    save it after `Olm.decrypt` created a session."""

    def __init__(self, device: str, account: vodozemac.Account, store_key: bytes) -> None:
        if not w.is_str(device, 1, MAX_ID_CHARS) or not w.is_bytes(store_key, KEY_BYTES):
            raise CryptoError("device id must be 1-64 characters, store key 32 bytes")
        self.device = device
        self.olm_account = account  # the wrapped vodozemac.Account (for `Olm`)
        self.store_key = store_key

    @classmethod
    def generate(cls, device: str | None = None) -> DeviceAccount:
        """A new account; without `device`, a random id as in v1 (`d-` + 22 characters)."""
        if device is None:
            device = f"d-{secrets.token_urlsafe(16)}"
        return cls(device, vodozemac.Account(), os.urandom(KEY_BYTES))

    @property
    def ed25519(self) -> bytes:
        """The device's Ed25519 public key, 32 raw bytes (what signs statements)."""
        return w.b64_decode(self.olm_account.ed25519_key.to_base64())

    @property
    def curve25519(self) -> bytes:
        """The device's Curve25519 public key, 32 raw bytes (its Olm identity key)."""
        return self.olm_account.curve25519_key.to_bytes()

    def sign(self, message: bytes) -> bytes:
        """A detached Ed25519 signature (64 raw bytes) over `message` with the device key."""
        return w.b64_decode(self.olm_account.sign(message).to_base64())

    def new_one_time_keys(self, count: int) -> dict[str, bytes]:
        """Generate `count` one-time keys; returns the new ones (key id -> 32 raw bytes) to
        upload. Call `mark_published` once the server stored them."""
        if not 1 <= count <= self.olm_account.max_number_of_one_time_keys:
            raise CryptoError("one-time key count out of range")
        before = set(self.olm_account.one_time_keys)
        self.olm_account.generate_one_time_keys(count)
        return {
            key_id: key.to_bytes()
            for key_id, key in self.olm_account.one_time_keys.items()
            if key_id not in before
        }

    def mark_published(self) -> None:
        self.olm_account.mark_keys_as_published()

    def save(
        self,
        passphrase: str,
        *,
        opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
        memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
    ) -> bytes:
        """The account encrypted under `passphrase`: Argon2id(passphrase, salt) is both the
        vodozemac pickle key of the account and the SecretBox key of {device, store_key};
        both sit in a versioned msgpack map with the magic, salt and limits."""
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        key = _derive(passphrase, salt, opslimit, memlimit)
        inner = pack({"device": self.device, "store_key": self.store_key})
        return pack(
            {
                "magic": ACCOUNT_MAGIC,
                "v": 1,
                "salt": salt,
                "ops": opslimit,
                "mem": memlimit,
                "account": self.olm_account.pickle(key),
                "box": bytes(nacl.secret.SecretBox(key).encrypt(inner)),
            }
        )

    @classmethod
    def load(cls, data: bytes, passphrase: str) -> DeviceAccount:
        """The account `save` wrote; CryptoError for a wrong passphrase or a damaged file."""
        outer = w.unpack(data, "account file")
        if not isinstance(outer, dict) or outer.get("magic") != ACCOUNT_MAGIC:
            raise CryptoError("not a device account file")
        if outer.get("v") != 1:
            raise CryptoError("unsupported device account file version")
        try:
            key = _derive(passphrase, outer["salt"], outer["ops"], outer["mem"])
            inner = w.unpack(nacl.secret.SecretBox(key).decrypt(outer["box"]), "account file")
            account = vodozemac.Account.from_pickle(outer["account"], key)
            return cls(inner["device"], account, inner["store_key"])
        except (nacl.exceptions.CryptoError, vodozemac.PickleException):
            raise CryptoError("wrong passphrase or damaged device account file") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise CryptoError(f"not a device account file: {exc}") from None


OLM_PREKEY = 0
OLM_NORMAL = 1


@dataclass(frozen=True)
class OlmPlaintext:
    """What an Olm message decrypted to, and which device's Olm session it came through.
    `sender_curve25519` is the Curve25519 key the session is bound to (Olm proves the sender
    holds its private key); `sender_user`/`sender_device` are what the caller claimed for it."""

    sender_user: str
    sender_device: str
    sender_curve25519: bytes
    plaintext: bytes


@dataclass
class _OlmEntry:
    curve25519: bytes
    session: vodozemac.Session


class Olm:
    """The Olm sessions of one device, kept per peer (user, device), newest first; at most
    `MAX_OLM_SESSIONS_PER_DEVICE` per peer device. Sessions are bound to the peer's Curve25519
    key: a session made with an older key is never used for a peer whose key is now another."""

    def __init__(self, account: DeviceAccount) -> None:
        self._account = account
        self._sessions: dict[tuple[str, str], list[_OlmEntry]] = {}

    def has_session(self, user: str, device: str, curve25519: bytes) -> bool:
        return any(e.curve25519 == curve25519 for e in self._sessions.get((user, device), []))

    def _remember(self, user: str, device: str, entry: _OlmEntry) -> None:
        entries = self._sessions.setdefault((user, device), [])
        if entry in entries:
            entries.remove(entry)
        entries.insert(0, entry)
        del entries[MAX_OLM_SESSIONS_PER_DEVICE:]

    def start(self, user: str, device: str, curve25519: bytes, one_time_key: bytes) -> None:
        """A new outbound session to (user, device), from its verified Curve25519 key and one
        one-time key claimed from the server (only its Curve25519 key; a wrong one-time key
        yields a session the peer cannot open, never a readable one)."""
        try:
            session = self._account.olm_account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_bytes(curve25519),
                vodozemac.Curve25519PublicKey.from_bytes(one_time_key),
            )
        except (vodozemac.KeyException, ValueError):
            raise CryptoError("bad Curve25519 key for an Olm session") from None
        self._remember(user, device, _OlmEntry(curve25519, session))

    def encrypt(
        self, user: str, device: str, curve25519: bytes, plaintext: bytes
    ) -> tuple[int, bytes]:
        """(message type, ciphertext) for (user, device) with its newest session bound to
        `curve25519`; type 0 (pre-key) until the peer has answered, then 1 (normal)."""
        for entry in self._sessions.get((user, device), []):
            if entry.curve25519 == curve25519:
                message_type, ciphertext = entry.session.encrypt(plaintext).to_parts()
                self._remember(user, device, entry)
                return message_type, ciphertext
        raise CryptoError("no Olm session with that device: claim a one-time key and start one")

    def decrypt(
        self, user: str, device: str, curve25519: bytes, message_type: int, ciphertext: bytes
    ) -> OlmPlaintext:
        """Decrypt an Olm message from (user, device), whose verified Curve25519 key is
        `curve25519`. Existing sessions bound to that key are tried first; a pre-key message
        no session matches creates one (using up one of our one-time keys: save the account
        afterwards). vodozemac refuses a pre-key message made from another identity key."""
        try:
            message = vodozemac.AnyOlmMessage.from_parts(message_type, ciphertext)
        except (vodozemac.DecodeException, ValueError):
            raise CryptoError("not an Olm message") from None
        prekey = message.to_pre_key() if message_type == OLM_PREKEY else None
        for entry in self._sessions.get((user, device), []):
            if entry.curve25519 != curve25519:
                continue
            if prekey is not None and not entry.session.session_matches(prekey):
                continue
            try:
                plaintext = entry.session.decrypt(message)
            except (vodozemac.OlmDecryptionException, ValueError):
                continue
            self._remember(user, device, entry)
            return OlmPlaintext(user, device, curve25519, plaintext)
        if prekey is None:
            raise CryptoError("no Olm session with that device opens the message")
        try:
            session, plaintext = self._account.olm_account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_bytes(curve25519), prekey
            )
        except (vodozemac.SessionCreationException, vodozemac.KeyException, ValueError):
            raise CryptoError(
                "Olm pre-key message does not open: made from another identity key, "
                "with a one-time key already used, or replayed"
            ) from None
        self._remember(user, device, _OlmEntry(curve25519, session))
        return OlmPlaintext(user, device, curve25519, plaintext)

    def pickle(self) -> bytes:
        """All sessions, each a vodozemac pickle under the account's `store_key`."""
        key = self._account.store_key
        return w.store(
            "olm",
            [
                [user, device, e.curve25519, e.session.pickle(key)]
                for (user, device), entries in self._sessions.items()
                for e in entries
            ],
        )

    @classmethod
    def unpickle(cls, account: DeviceAccount, data: bytes) -> Olm:
        olm = cls(account)
        try:
            for user, device, curve, pickled in reversed(w.unstore(data, "olm")):
                session = vodozemac.Session.from_pickle(pickled, account.store_key)
                olm._remember(user, device, _OlmEntry(curve, session))
        except (vodozemac.PickleException, ValueError, TypeError):
            raise CryptoError("Olm store does not open with this account") from None
        return olm
