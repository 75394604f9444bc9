"""A user's own signing key for E2EE v2 (docs/e2ee/identity.md, sections 2 and 9).

- `UserKeys`: the user key; certifies devices (`DeviceCertificate`), revokes them
  (`Revocation`), announces and rotates itself (`UserKeyStatement`), and is backed up under a
  passphrase (Argon2id -> XSalsa20-Poly1305, `BACKUP_MAGIC`) for recovery.

The statements it signs, and their verification, are in `crypto/identity.py`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, replace

import msgpack
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils
import vodozemac
from nacl.signing import SigningKey

from .e2ee import CryptoError, pack
from .identity import (
    SIG_BYTES,
    DeviceCertificate,
    Revocation,
    UserKeyStatement,
    _check_signature,
    _need_bytes,
    _need_int,
    _need_text,
    device_acceptance,
    device_self_statement,
    raw_curve25519,
    raw_ed25519,
    revocation_statement,
    user_key_statement,
)

__all__ = ["BACKUP_MAGIC", "UserKeys"]

BACKUP_MAGIC = "rt.v2.user-key-backup"
# Argon2id limits a backup may ask for: at least libsodium's minimum, at most its "sensitive"
# preset (1 GiB), so a crafted backup cannot make restore allocate without bound.
_OPS_RANGE = (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE)
_MEM_RANGE = (nacl.pwhash.argon2id.MEMLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE)


# --- the user key itself -----------------------------------------------------------------------


@dataclass(frozen=True)
class UserKeys:
    """A user's signing key. Held by the user's trusted devices and by the recovery backup."""

    user: str
    signing: SigningKey

    @classmethod
    def generate(cls, user: str) -> UserKeys:
        return cls(_need_text("user", user), SigningKey.generate())

    @property
    def public(self) -> bytes:
        return bytes(self.signing.verify_key)

    def _sign(self, message: bytes) -> bytes:
        return self.signing.sign(message).signature

    def certify(
        self, device: str, ed25519: bytes, curve25519: bytes, created_ms: int, device_sig: bytes
    ) -> DeviceCertificate:
        """Certify a device's keys. `device_sig` is the device's acceptance of this user key
        (`device_acceptance`), checked first: the user key never vouches for keys whose
        holder did not ask for it."""
        unsigned = DeviceCertificate(
            self.user, device, ed25519, curve25519, created_ms, bytes(SIG_BYTES), device_sig
        )
        unsigned._check_shape()
        _check_signature(
            "device self-signature (device ed25519 key)",
            ed25519,
            device_self_statement(self.user, device, self.public),
            device_sig,
        )
        return replace(unsigned, user_sig=self._sign(unsigned.statement()))

    def certify_account(
        self, account: vodozemac.Account, device: str, created_ms: int
    ) -> DeviceCertificate:
        """Certify a vodozemac account held in this same process (the device's own keys)."""
        return self.certify(
            device,
            raw_ed25519(account.ed25519_key),
            raw_curve25519(account.curve25519_key),
            created_ms,
            device_acceptance(account, self.user, device, self.public),
        )

    def revoke(self, device: str, revoked_ms: int) -> Revocation:
        statement = revocation_statement(self.user, device, revoked_ms, by_device=False)
        return Revocation(self.user, device, revoked_ms, False, self._sign(statement))

    def announce(
        self, created_ms: int, *, rotated_from: UserKeys | None = None
    ) -> UserKeyStatement:
        """This key's announcement: a first key or a reset without `rotated_from`; a rotation
        (co-signed by the old key, so contacts accept it without re-verifying) with it."""
        if rotated_from is not None and rotated_from.user != self.user:
            raise CryptoError("a rotation must stay with the same user")
        previous = b"" if rotated_from is None else rotated_from.public
        message = user_key_statement(self.user, self.public, created_ms, previous)
        previous_sig = b"" if rotated_from is None else rotated_from._sign(message)
        return UserKeyStatement(
            self.user, self.public, created_ms, previous, self._sign(message), previous_sig
        )

    def backup(
        self,
        passphrase: str,
        *,
        opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
        memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
        _salt: bytes | None = None,
        _nonce: bytes | None = None,
    ) -> bytes:
        """The recovery backup: the key encrypted under Argon2id(passphrase). `_salt` and
        `_nonce` exist only to make test vectors; never pass them otherwise."""
        _check_limits(opslimit, memlimit)
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES) if _salt is None else _salt
        nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE) if _nonce is None else _nonce
        key = _backup_key(passphrase, salt, opslimit, memlimit)
        secret = pack(["rt.v2.user-key-secret", self.user, bytes(self.signing)])
        box = bytes(nacl.secret.SecretBox(key).encrypt(secret, nonce))
        return pack(
            {"magic": BACKUP_MAGIC, "salt": salt, "ops": opslimit, "mem": memlimit, "box": box}
        )

    @classmethod
    def restore(cls, data: bytes, passphrase: str) -> UserKeys:
        """Open a recovery backup; CryptoError for a wrong passphrase or a damaged backup."""
        try:
            outer = msgpack.unpackb(data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise CryptoError("not a user-key backup") from None
        if not isinstance(outer, dict) or outer.get("magic") != BACKUP_MAGIC:
            raise CryptoError("not a user-key backup")
        salt = _need_bytes("salt", outer.get("salt"), nacl.pwhash.argon2id.SALTBYTES)
        ops, mem = _need_int("ops", outer.get("ops")), _need_int("mem", outer.get("mem"))
        _check_limits(ops, mem)
        box = outer.get("box")
        if not isinstance(box, bytes):
            raise CryptoError("backup box must be bytes")
        key = _backup_key(passphrase, salt, ops, mem)
        try:
            secret = nacl.secret.SecretBox(key).decrypt(box)
        except nacl.exceptions.CryptoError:
            raise CryptoError("wrong passphrase or damaged backup") from None
        inner = msgpack.unpackb(secret, raw=False)
        if not isinstance(inner, list) or len(inner) != 3 or inner[0] != "rt.v2.user-key-secret":
            raise CryptoError("backup content is not a user key")
        return cls(_need_text("user", inner[1]), SigningKey(_need_bytes("seed", inner[2], 32)))


def _check_limits(ops: int, mem: int) -> None:
    if not _OPS_RANGE[0] <= ops <= _OPS_RANGE[1] or not _MEM_RANGE[0] <= mem <= _MEM_RANGE[1]:
        raise CryptoError(f"Argon2id limits out of range: ops {_OPS_RANGE}, mem {_MEM_RANGE} bytes")


def _backup_key(passphrase: str, salt: bytes, ops: int, mem: int) -> bytes:
    """Argon2id over the passphrase in Unicode NFC (the same words typed on another platform
    give the same bytes)."""
    secret = unicodedata.normalize("NFC", passphrase).encode()
    key: bytes = nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, secret, salt, opslimit=ops, memlimit=mem
    )
    return key
