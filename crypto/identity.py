"""Cross-signing and contact verification for E2EE v2 (docs/e2ee/identity.md), on PyNaCl.

A user has one *user signing key* (Ed25519). It vouches for the user's devices, so that a
client gives keys only to devices the user itself certified, never to a device the server
added:

- `UserKeys`: the user key; certifies devices, revokes them, announces and rotates itself, and
  is backed up under a passphrase (Argon2id -> XSalsa20-Poly1305) for recovery.
- `DeviceCertificate`: the user key's signature over a device's vodozemac (Olm) keys, plus the
  device's own signature accepting that user key (so nobody can certify someone else's device
  keys as theirs). `Revocation`: a device withdrawn, by the user key or by the device itself.
  `UserKeyStatement`: a user key announced, or rotated (then signed by the old key too).
- `verified_devices`: the devices a client may encrypt to, from what the server claims.
- `safety_number` / `verification_payload`: what two people compare (Signal's numeric
  fingerprint construction) to verify each other's user keys.
- `ContactBook`: the client's record of other users' keys (trust on first use, verified,
  blocked on an unconfirmed change) and the events a change raises.

Every signed statement is a msgpack array whose first element is a domain tag `rt.v2.<what>`;
signatures are detached Ed25519 (64 bytes) over exactly those bytes; keys are raw bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import msgpack
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils
import vodozemac
from nacl.signing import SigningKey, VerifyKey

from .e2ee import CryptoError

__all__ = [
    "BACKUP_MAGIC",
    "FINGERPRINT_ITERATIONS",
    "Change",
    "ContactBook",
    "ContactState",
    "CryptoError",
    "DeviceCertificate",
    "Revocation",
    "UserKeyStatement",
    "UserKeys",
    "VerifiedDevice",
    "certificate_statement",
    "device_acceptance",
    "device_self_statement",
    "fingerprint",
    "fingerprint_digits",
    "raw_curve25519",
    "raw_ed25519",
    "raw_signature",
    "revocation_statement",
    "safety_number",
    "user_key_statement",
    "verification_matches",
    "verification_payload",
    "verified_devices",
    "verify_certificate",
    "verify_revocation",
    "verify_user_key",
]

KEY_BYTES = 32
SIG_BYTES = 64
BACKUP_MAGIC = "rt.v2.user-key-backup"
FINGERPRINT_ITERATIONS = 5200
_FINGERPRINT_VERSION = b"\x00\x00"
# Argon2id limits a backup may ask for: at least libsodium's minimum, at most its "sensitive"
# preset (1 GiB), so a crafted backup cannot make restore allocate without bound.
_OPS_RANGE = (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE)
_MEM_RANGE = (nacl.pwhash.argon2id.MEMLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE)


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


# --- shape checks: every verifier runs these first, so a malformed field is named -------------


def _need_bytes(what: str, value: object, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise CryptoError(f"{what} must be {size} bytes")
    return value


def _need_text(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise CryptoError(f"{what} must be a non-empty string")
    return value


def _need_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CryptoError(f"{what} must be an integer")
    return value


def _need_ms(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise CryptoError(f"{what} must be a non-negative integer (ms)")
    return value


def _check_signature(what: str, key: bytes, message: bytes, signature: bytes) -> None:
    try:
        VerifyKey(key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        raise CryptoError(f"{what} does not verify") from None


def _wire_field(wire: dict[str, Any], name: str) -> Any:
    if not isinstance(wire, dict) or name not in wire:
        raise CryptoError(f"missing field {name!r}")
    return wire[name]


# --- vodozemac boundary: its keys and signatures are unpadded base64; we sign raw bytes ---------


def _unbase64(what: str, text: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError(f"{what} is not base64") from None
    return _need_bytes(what, raw, size)


def raw_ed25519(key: vodozemac.Ed25519PublicKey) -> bytes:
    """A vodozemac Ed25519 public key (a device's fingerprint key) as its 32 raw bytes."""
    return _unbase64("ed25519 key", key.to_base64(), KEY_BYTES)


def raw_curve25519(key: vodozemac.Curve25519PublicKey) -> bytes:
    """A vodozemac Curve25519 public key (a device's Olm identity key) as its 32 raw bytes."""
    return _unbase64("curve25519 key", key.to_base64(), KEY_BYTES)


def raw_signature(signature: vodozemac.Ed25519Signature) -> bytes:
    """A vodozemac Ed25519 signature (standard Ed25519, RFC 8032) as its 64 raw bytes."""
    return _unbase64("signature", signature.to_base64(), SIG_BYTES)


# --- statements: the exact bytes that get signed ---------------------------------------------


def certificate_statement(
    user: str, device: str, ed25519: bytes, curve25519: bytes, created_ms: int
) -> bytes:
    """What the user key signs to certify a device's keys."""
    return _pack(["rt.v2.device", user, device, ed25519, curve25519, created_ms])


def device_self_statement(user: str, device: str, user_pub: bytes) -> bytes:
    """What a device signs (with its own Ed25519 key) to accept `user_pub` as its user key."""
    return _pack(["rt.v2.device-self", user, device, user_pub])


def revocation_statement(user: str, device: str, revoked_ms: int, *, by_device: bool) -> bytes:
    """What a revocation signs: `rt.v2.revoke` (user key) or `rt.v2.revoke-self` (the device)."""
    tag = "rt.v2.revoke-self" if by_device else "rt.v2.revoke"
    return _pack([tag, user, device, revoked_ms])


def user_key_statement(user: str, user_pub: bytes, created_ms: int, previous: bytes) -> bytes:
    """What announces a user key; `previous` is the key it replaces, or b"" for none."""
    return _pack(["rt.v2.user-key", user, user_pub, created_ms, previous])


def device_acceptance(account: vodozemac.Account, user: str, device: str, user_pub: bytes) -> bytes:
    """The device's signature (64 bytes) accepting `user_pub`, made by its vodozemac account."""
    return raw_signature(account.sign(device_self_statement(user, device, user_pub)))


# --- device certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCertificate:
    """A device's keys certified by its user's key, and accepted by the device."""

    user: str
    device: str
    ed25519: bytes  # the device's vodozemac Ed25519 key, raw
    curve25519: bytes  # the device's vodozemac Curve25519 (Olm identity) key, raw
    created_ms: int
    user_sig: bytes  # user key over certificate_statement(...)
    device_sig: bytes  # device's ed25519 over device_self_statement(user, device, user_pub)

    def statement(self) -> bytes:
        return certificate_statement(
            self.user, self.device, self.ed25519, self.curve25519, self.created_ms
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "device": self.device,
            "ed25519": self.ed25519,
            "curve25519": self.curve25519,
            "created_ms": self.created_ms,
            "user_sig": self.user_sig,
            "device_sig": self.device_sig,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> DeviceCertificate:
        """Parse and shape-check (types, sizes); signatures are checked by `verify`."""
        cert = cls(
            user=_wire_field(wire, "user"),
            device=_wire_field(wire, "device"),
            ed25519=_wire_field(wire, "ed25519"),
            curve25519=_wire_field(wire, "curve25519"),
            created_ms=_wire_field(wire, "created_ms"),
            user_sig=_wire_field(wire, "user_sig"),
            device_sig=_wire_field(wire, "device_sig"),
        )
        cert._check_shape()
        return cert

    def _check_shape(self) -> None:
        _need_text("user", self.user)
        _need_text("device", self.device)
        _need_bytes("ed25519", self.ed25519, KEY_BYTES)
        _need_bytes("curve25519", self.curve25519, KEY_BYTES)
        _need_ms("created_ms", self.created_ms)
        _need_bytes("user_sig", self.user_sig, SIG_BYTES)
        _need_bytes("device_sig", self.device_sig, SIG_BYTES)

    def verify(self, user_pub: bytes) -> None:
        """Raise CryptoError unless this certificate holds under `user_pub` (see
        `verify_certificate`)."""
        verify_certificate(self, user_pub)


def verify_certificate(cert: DeviceCertificate, user_pub: bytes) -> None:
    """Check, in order: the shape of every field and of `user_pub`; the user key's signature
    over the certificate statement; the device's signature accepting `user_pub`. Raise
    CryptoError naming the first check that fails."""
    _need_bytes("user key", user_pub, KEY_BYTES)
    cert._check_shape()
    _check_signature("certificate signature (user key)", user_pub, cert.statement(), cert.user_sig)
    _check_signature(
        "device self-signature (device ed25519 key)",
        cert.ed25519,
        device_self_statement(cert.user, cert.device, user_pub),
        cert.device_sig,
    )


# --- revocations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    """A device withdrawn, by the user key (`by_device` False) or by the device itself."""

    user: str
    device: str
    revoked_ms: int
    by_device: bool
    sig: bytes

    def statement(self) -> bytes:
        return revocation_statement(
            self.user, self.device, self.revoked_ms, by_device=self.by_device
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "device": self.device,
            "revoked_ms": self.revoked_ms,
            "by": "device" if self.by_device else "user",
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Revocation:
        by = _wire_field(wire, "by")
        if by not in ("user", "device"):
            raise CryptoError("revocation 'by' must be 'user' or 'device'")
        rev = cls(
            user=_wire_field(wire, "user"),
            device=_wire_field(wire, "device"),
            revoked_ms=_wire_field(wire, "revoked_ms"),
            by_device=by == "device",
            sig=_wire_field(wire, "sig"),
        )
        rev._check_shape()
        return rev

    def _check_shape(self) -> None:
        _need_text("user", self.user)
        _need_text("device", self.device)
        _need_ms("revoked_ms", self.revoked_ms)
        _need_bytes("sig", self.sig, SIG_BYTES)

    @classmethod
    def by_own_device(
        cls, signer: SigningKey | vodozemac.Account, user: str, device: str, revoked_ms: int
    ) -> Revocation:
        """A device revoking itself, signed by its Ed25519 key (a vodozemac account, or a
        PyNaCl key standing in for one)."""
        statement = revocation_statement(user, device, revoked_ms, by_device=True)
        if isinstance(signer, SigningKey):
            sig = signer.sign(statement).signature
        else:
            sig = raw_signature(signer.sign(statement))
        return cls(user, device, revoked_ms, True, sig)


def verify_revocation(
    rev: Revocation, user_pub: bytes, device_ed25519: bytes | None = None
) -> None:
    """Check a revocation's shape, then its signature: by the user key (`user_pub`), or for
    a self-revocation by `device_ed25519` (taken from the device's verified certificate)."""
    _need_bytes("user key", user_pub, KEY_BYTES)
    rev._check_shape()
    if not rev.by_device:
        _check_signature("revocation signature (user key)", user_pub, rev.statement(), rev.sig)
        return
    if device_ed25519 is None:
        raise CryptoError("self-revocation needs the device's certified ed25519 key")
    _need_bytes("device ed25519 key", device_ed25519, KEY_BYTES)
    _check_signature(
        "self-revocation signature (device ed25519 key)", device_ed25519, rev.statement(), rev.sig
    )


# --- user keys: announcement and rotation ------------------------------------------------------


@dataclass(frozen=True)
class UserKeyStatement:
    """A user key announced. `previous` is b"" for a first key or a reset (not vouched for by
    any earlier key); otherwise the key it rotates from, which must co-sign (`previous_sig`)."""

    user: str
    user_pub: bytes
    created_ms: int
    previous: bytes
    sig: bytes  # by user_pub itself
    previous_sig: bytes  # by `previous`, or b""

    @property
    def is_rotation(self) -> bool:
        return self.previous != b""

    def statement(self) -> bytes:
        return user_key_statement(self.user, self.user_pub, self.created_ms, self.previous)

    def to_wire(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "user_pub": self.user_pub,
            "created_ms": self.created_ms,
            "previous": self.previous,
            "sig": self.sig,
            "previous_sig": self.previous_sig,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> UserKeyStatement:
        st = cls(
            user=_wire_field(wire, "user"),
            user_pub=_wire_field(wire, "user_pub"),
            created_ms=_wire_field(wire, "created_ms"),
            previous=_wire_field(wire, "previous"),
            sig=_wire_field(wire, "sig"),
            previous_sig=_wire_field(wire, "previous_sig"),
        )
        st._check_shape()
        return st

    def _check_shape(self) -> None:
        _need_text("user", self.user)
        _need_bytes("user_pub", self.user_pub, KEY_BYTES)
        _need_ms("created_ms", self.created_ms)
        _need_bytes("sig", self.sig, SIG_BYTES)
        if self.previous == b"":
            if self.previous_sig != b"":
                raise CryptoError("previous_sig must be empty when previous is empty")
        else:
            _need_bytes("previous", self.previous, KEY_BYTES)
            _need_bytes("previous_sig", self.previous_sig, SIG_BYTES)
            if self.previous == self.user_pub:
                raise CryptoError("a rotation must change the key")


def verify_user_key(st: UserKeyStatement) -> None:
    """Check the shape; the new key's self-signature; and for a rotation the old key's
    signature over the same bytes. Raise CryptoError naming the failed check."""
    st._check_shape()
    message = st.statement()
    _check_signature("user-key self-signature (new key)", st.user_pub, message, st.sig)
    if st.is_rotation:
        _check_signature(
            "user-key rotation signature (old key)", st.previous, message, st.previous_sig
        )


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
        secret = _pack(["rt.v2.user-key-secret", self.user, bytes(self.signing)])
        box = bytes(nacl.secret.SecretBox(key).encrypt(secret, nonce))
        return _pack(
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


# --- the devices a client may encrypt to -------------------------------------------------------


@dataclass(frozen=True)
class VerifiedDevice:
    user: str
    device: str
    ed25519: bytes
    curve25519: bytes
    created_ms: int


def verified_devices(
    user: str,
    user_pub: bytes,
    certs: Iterable[DeviceCertificate],
    revocations: Iterable[Revocation] = (),
) -> list[VerifiedDevice]:
    """The devices of `user` that hold under `user_pub`, sorted by device id: certificates
    for another user or that fail `verify_certificate` are dropped; of several valid
    certificates for one device id the newest wins (two different ones with the same time
    drop the device: ambiguous); a device named by a valid revocation (by the user key, or
    self-signed by any key ever certified for that device id) is dropped for good."""
    _need_bytes("user key", user_pub, KEY_BYTES)
    valid: dict[str, set[DeviceCertificate]] = {}
    for cert in certs:
        if cert.user != user:
            continue
        try:
            verify_certificate(cert, user_pub)
        except CryptoError:
            continue
        valid.setdefault(cert.device, set()).add(cert)
    keys = {device: {c.ed25519 for c in found} for device, found in valid.items()}
    revoked = _revoked(user, user_pub, revocations, keys)
    devices = []
    for device in sorted(valid):
        if device in revoked:
            continue
        latest = max(c.created_ms for c in valid[device])
        top = [c for c in valid[device] if c.created_ms == latest]
        if len(top) == 1:
            c = top[0]
            devices.append(VerifiedDevice(c.user, c.device, c.ed25519, c.curve25519, c.created_ms))
    return devices


def _revoked(
    user: str,
    user_pub: bytes,
    revocations: Iterable[Revocation],
    certified_keys: dict[str, set[bytes]],
) -> set[str]:
    """The device ids of `user` named by a revocation that verifies."""
    revoked: set[str] = set()
    for rev in revocations:
        if rev.user != user:
            continue
        candidates = sorted(certified_keys.get(rev.device, ())) if rev.by_device else [None]
        for device_key in candidates:
            try:
                verify_revocation(rev, user_pub, device_key)
            except CryptoError:
                continue
            revoked.add(rev.device)
            break
    return revoked


# --- safety numbers and the QR payload ---------------------------------------------------------


def fingerprint(user: str, user_pub: bytes) -> bytes:
    """One side's fingerprint (64 bytes), as Signal's NumericFingerprintGenerator (version 0)
    computes it: h = 0x0000 || key || user id (UTF-8); then 5200 times h = SHA-512(h || key)."""
    _need_text("user", user)
    _need_bytes("user key", user_pub, KEY_BYTES)
    h = _FINGERPRINT_VERSION + user_pub + user.encode()
    for _ in range(FINGERPRINT_ITERATIONS):
        h = hashlib.sha512(h + user_pub).digest()
    return h


def fingerprint_digits(user: str, user_pub: bytes) -> str:
    """30 digits: the fingerprint's first 30 bytes as six 5-byte big-endian integers, each
    mod 100000 and written as 5 digits."""
    h = fingerprint(user, user_pub)
    return "".join(f"{int.from_bytes(h[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5))


def safety_number(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> str:
    """The 60-digit number two users compare, as 12 groups of 5 digits separated by spaces;
    the two halves are sorted, so both sides see the same number."""
    halves = sorted([fingerprint_digits(user_a, key_a), fingerprint_digits(user_b, key_b)])
    digits = "".join(halves)
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))


def _sorted_pair(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> list[Any]:
    """The two (user, key) pairs in byte order (user id as UTF-8, then key): the same on both
    sides, whatever the language's own string order is."""
    pairs = sorted([(user_a.encode(), key_a, user_a), (user_b.encode(), key_b, user_b)])
    return [pairs[0][2], pairs[0][1], pairs[1][2], pairs[1][1]]


def verification_payload(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> bytes:
    """What one side shows as a QR code and the other scans: both user ids and keys."""
    for user, key in ((user_a, key_a), (user_b, key_b)):
        _need_text("user", user)
        _need_bytes("user key", key, KEY_BYTES)
    return _pack(["rt.v2.verify", *_sorted_pair(user_a, key_a, user_b, key_b)])


def verification_matches(
    scanned: bytes, me: str, my_key: bytes, them: str, their_key: bytes
) -> bool:
    """True when a scanned payload names exactly these two users with exactly these keys."""
    return hmac.compare_digest(scanned, verification_payload(me, my_key, them, their_key))


# --- the contact book --------------------------------------------------------------------------

ContactState = Literal["unverified", "verified", "blocked"]
_CONTACTS_TAG = "rt.v2.contacts"


@dataclass(frozen=True)
class Change:
    """A contact's user key changed. `kind` is "rotation" when the old key signed the new one
    (accepted, nothing to confirm) and "reset" otherwise. `blocked`: nothing may be shared with
    the user until the app calls `ContactBook.confirm` (or `verify`) with `new`."""

    user: str
    old: bytes
    new: bytes
    was_verified: bool
    kind: Literal["rotation", "reset"]
    blocked: bool


@dataclass
class _Contact:
    key: bytes  # the key in use (while blocked: the one before the change)
    verified: bool
    pending: bytes | None  # a changed key waiting for the app's confirmation


class ContactBook:
    """Other users' user keys as this client knows them.

    First sight is trust on first use (`unverified`); the app marks a user `verified` after
    the safety numbers matched. A key change raises a `Change`: a rotation co-signed by the
    old key is accepted; a reset of a verified user blocks them (`may_share` False) until the
    app confirms; a reset of an unverified user is accepted (policy "accept") or blocks too
    (policy "block")."""

    def __init__(self, *, on_unverified_change: Literal["accept", "block"] = "accept") -> None:
        if on_unverified_change not in ("accept", "block"):
            raise ValueError("on_unverified_change must be 'accept' or 'block'")
        self.on_unverified_change = on_unverified_change
        self._contacts: dict[str, _Contact] = {}

    def observe(
        self, user: str, user_pub: bytes, rotation: Sequence[UserKeyStatement] = ()
    ) -> Change | None:
        """Record the key the directory shows for `user`. `rotation`: the user-key statements
        leading from the key on record to `user_pub` (one per rotation, oldest first); when
        they all verify, the change is a rotation. Returns the change, if any."""
        _need_text("user", user)
        _need_bytes("user key", user_pub, KEY_BYTES)
        c = self._contacts.get(user)
        if c is None:
            self._contacts[user] = _Contact(user_pub, False, None)
            return None
        if user_pub == c.key or user_pub == c.pending:
            return None
        old = c.key
        if _rotation_holds(user, old, user_pub, rotation):
            self._contacts[user] = _Contact(user_pub, c.verified, None)
            return Change(user, old, user_pub, c.verified, "rotation", False)
        if c.verified or c.pending is not None or self.on_unverified_change == "block":
            c.pending = user_pub
            return Change(user, old, user_pub, c.verified, "reset", True)
        c.key = user_pub
        return Change(user, old, user_pub, False, "reset", False)

    def verify(self, user: str, user_pub: bytes) -> None:
        """The app compared safety numbers (or scanned the QR code) for `user_pub`. Verifying
        a pending key also confirms it. CryptoError if `user_pub` is neither the key on record
        nor the pending one."""
        _need_text("user", user)
        _need_bytes("user key", user_pub, KEY_BYTES)
        c = self._contacts.get(user)
        if c is None:
            self._contacts[user] = _Contact(user_pub, True, None)
        elif user_pub == c.pending:
            self._contacts[user] = _Contact(user_pub, True, None)
        elif user_pub == c.key:
            c.verified = True
        else:
            raise CryptoError("that key is not the one on record for the user")

    def confirm(self, user: str, new_pub: bytes) -> None:
        """The app accepts a pending changed key without verifying it: the user becomes
        `unverified` with `new_pub`, and may be shared with again."""
        c = self._contacts.get(user)
        if c is None or c.pending is None or c.pending != new_pub:
            raise CryptoError("no pending change to that key")
        self._contacts[user] = _Contact(new_pub, False, None)

    def state(self, user: str) -> ContactState | None:
        """The user's state; None for a user never seen."""
        c = self._contacts.get(user)
        if c is None:
            return None
        if c.pending is not None:
            return "blocked"
        return "verified" if c.verified else "unverified"

    def key(self, user: str) -> bytes | None:
        """The user key in use (while blocked: the one from before the change)."""
        c = self._contacts.get(user)
        return None if c is None else c.key

    def pending(self, user: str) -> bytes | None:
        """The changed key waiting for confirmation, if any."""
        c = self._contacts.get(user)
        return None if c is None else c.pending

    def may_share(self, user: str) -> bool:
        """Whether keys may go to this user's devices: known, and not blocked."""
        return self.state(user) in ("unverified", "verified")

    def to_bytes(self) -> bytes:
        """The book (not the policy, which is the app's setting) as msgpack."""
        rows = [
            [user, c.key, c.verified, b"" if c.pending is None else c.pending]
            for user, c in sorted(self._contacts.items())
        ]
        return _pack([_CONTACTS_TAG, rows])

    @classmethod
    def from_bytes(
        cls, data: bytes, *, on_unverified_change: Literal["accept", "block"] = "accept"
    ) -> ContactBook:
        book = cls(on_unverified_change=on_unverified_change)
        try:
            tag, rows = msgpack.unpackb(data, raw=False)
            if tag != _CONTACTS_TAG:
                raise CryptoError("not a contact book")
            for user, key, verified, pending in rows:
                _need_text("user", user)
                _need_bytes("user key", key, KEY_BYTES)
                if not isinstance(verified, bool):
                    raise CryptoError("verified must be a boolean")
                if pending != b"":
                    _need_bytes("pending key", pending, KEY_BYTES)
                book._contacts[user] = _Contact(key, verified, pending or None)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise CryptoError("not a contact book") from None
        return book


def _rotation_holds(user: str, old: bytes, new: bytes, chain: Sequence[UserKeyStatement]) -> bool:
    """Whether `chain` leads from `old` to `new` for `user`, each step a verified rotation
    signed by the key before it."""
    if not chain:
        return False
    current = old
    for st in chain:
        if st.user != user or not st.is_rotation or st.previous != current:
            return False
        try:
            verify_user_key(st)
        except CryptoError:
            return False
        current = st.user_pub
    return current == new
