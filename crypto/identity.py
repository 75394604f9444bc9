"""Cross-signing for E2EE v2 (docs/e2ee/identity.md): the signed statements, on PyNaCl.

A user's *user signing key* (`crypto/user_keys.py`) vouches for the user's devices, so that a
client gives keys only to devices the user itself certified, never to one the server added.

- `DeviceCertificate`: the user key's signature over a device's vodozemac (Olm) keys, plus the
  device's own signature accepting that user key. `Revocation`: a device withdrawn, by the
  user key or by the device itself. `UserKeyStatement`: a user key announced, or rotated.
- `*_statement` / `verify_*`: the exact signed bytes and their checks; `raw_*`: vodozemac
  keys and signatures as raw bytes. `verified_devices`: the devices a client may encrypt to.

Every signed statement is a msgpack array whose first element is a domain tag `rt.v2.<what>`;
signatures are detached Ed25519 (64 bytes) over exactly those bytes; keys are raw bytes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import vodozemac
from nacl.signing import SigningKey, VerifyKey

from .e2ee import CryptoError, pack

__all__ = [
    "CryptoError",
    "DeviceCertificate",
    "Revocation",
    "UserKeyStatement",
    "VerifiedDevice",
    "certificate_statement",
    "device_acceptance",
    "device_self_statement",
    "raw_curve25519",
    "raw_ed25519",
    "raw_signature",
    "revocation_statement",
    "user_key_statement",
    "verified_devices",
    "verify_certificate",
    "verify_revocation",
    "verify_user_key",
]

KEY_BYTES = 32
SIG_BYTES = 64


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
    return pack(["rt.v2.device", user, device, ed25519, curve25519, created_ms])


def device_self_statement(user: str, device: str, user_pub: bytes) -> bytes:
    """What a device signs (with its own Ed25519 key) to accept `user_pub` as its user key."""
    return pack(["rt.v2.device-self", user, device, user_pub])


def revocation_statement(user: str, device: str, revoked_ms: int, *, by_device: bool) -> bytes:
    """What a revocation signs: `rt.v2.revoke` (user key) or `rt.v2.revoke-self` (the device)."""
    tag = "rt.v2.revoke-self" if by_device else "rt.v2.revoke"
    return pack([tag, user, device, revoked_ms])


def user_key_statement(user: str, user_pub: bytes, created_ms: int, previous: bytes) -> bytes:
    """What announces a user key; `previous` is the key it replaces, or b"" for none."""
    return pack(["rt.v2.user-key", user, user_pub, created_ms, previous])


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
