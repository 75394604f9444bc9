"""Membership the server cannot forge (E2EE v2, docs/e2ee/membership.md): the entries.

A `room:` channel's membership is a hash chain of entries, each signed by the Ed25519 key of
the device that made the change. This module offers one entry's bytes and shape:

- `MemberEntry` (`to_wire` / `from_wire`), `entry_statement`, `entry_hash`, `sign_entry`;
  `check_shape`: the rules an entry obeys whatever the state.
- The vocabulary (`OPS`, `ROLES`, `MANAGERS`, `ROTATING_OPS`, `WIRE_FIELDS`, `ZERO_HASH`) and
  the errors (`MembershipError` with its `kind`, `ForkError` with both entries as evidence).

Verifying a log, the rules table and the client rules are in `crypto/membership_state.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from nacl.signing import SigningKey

from .e2ee import CryptoError, pack

TAG: Final = "rt.v2.member"
HASH_BYTES: Final = 32
SIG_BYTES: Final = 64
ZERO_HASH: Final = bytes(HASH_BYTES)  # `prev_hash` of the "create" entry (epoch 1)
MAX_INT: Final = 2**53 - 1  # epochs and times stay exact in a JavaScript number

OPS: Final = frozenset({"create", "add", "remove", "role", "leave"})
ROLES: Final = frozenset({"owner", "admin", "member"})
MANAGERS: Final = frozenset({"owner", "admin"})  # may add and remove members
ROTATING_OPS: Final = frozenset({"remove", "leave"})  # a reader is gone: senders re-seed

WIRE_FIELDS: Final = (
    "channel",
    "epoch",
    "prev",
    "op",
    "user",
    "role",
    "actor",
    "actor_device",
    "ts",
    "sig",
)


class MembershipError(CryptoError):
    """An entry or log that does not verify, or a send the log forbids.

    `kind` is a stable short code (the spec's error list): "malformed", "channel", "epoch",
    "prev_hash", "unknown_device", "signature", "forbidden", "invalid", "fork" (entries);
    "stale_session", "behind", "not_member" (the client rules); `reason` says exactly what
    is wrong, for logs and people."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind


class ForkError(MembershipError):
    """Two different entries, both validly signed by an authorised device, for one epoch (or a
    head heard elsewhere that differs from ours at an epoch we hold): proof that someone, most
    likely the server, shows different histories to different members. `ours` is our entry at
    that epoch; `theirs` the conflicting one (None when only its hash was heard)."""

    def __init__(
        self, epoch: int, ours: MemberEntry, theirs: MemberEntry | None, theirs_hash: bytes
    ) -> None:
        super().__init__(
            "fork",
            f"two different entries for epoch {epoch}: ours {ours.hash().hex()[:16]}…, "
            f"theirs {theirs_hash.hex()[:16]}…",
        )
        self.epoch = epoch
        self.ours = ours
        self.theirs = theirs
        self.theirs_hash = theirs_hash


def entry_statement(
    channel: str,
    epoch: int,
    prev_hash: bytes,
    op: str,
    target_user: str,
    role: str,
    actor_user: str,
    actor_device: str,
    ts_ms: int,
) -> bytes:
    """The bytes an entry's signature covers and whose SHA-256 the next entry links to."""
    return pack(
        [TAG, channel, epoch, prev_hash, op, target_user, role, actor_user, actor_device, ts_ms]
    )


def entry_hash(statement: bytes) -> bytes:
    """SHA-256 of an entry's statement bytes: the next entry's `prev_hash`."""
    return hashlib.sha256(statement).digest()


@dataclass(frozen=True, slots=True)
class MemberEntry:
    """One signed change of a room's membership (field order = statement order)."""

    channel: str
    epoch: int
    prev_hash: bytes
    op: str
    target_user: str
    role: str
    actor_user: str
    actor_device: str
    ts_ms: int
    sig: bytes

    def statement(self) -> bytes:
        return entry_statement(
            self.channel,
            self.epoch,
            self.prev_hash,
            self.op,
            self.target_user,
            self.role,
            self.actor_user,
            self.actor_device,
            self.ts_ms,
        )

    def hash(self) -> bytes:
        return entry_hash(self.statement())

    def to_wire(self) -> dict[str, Any]:
        """The entry as a frame field: a map of the fields, byte strings as bytes (msgpack
        bin; the JSON codec writes them as base64, as for every byte field)."""
        return {
            "channel": self.channel,
            "epoch": self.epoch,
            "prev": self.prev_hash,
            "op": self.op,
            "user": self.target_user,
            "role": self.role,
            "actor": self.actor_user,
            "actor_device": self.actor_device,
            "ts": self.ts_ms,
            "sig": self.sig,
        }

    @classmethod
    def from_wire(cls, data: object) -> MemberEntry:
        """Parse and check the shape of an entry (`malformed` otherwise); nothing about
        whether it verifies or is allowed: that is `MembershipState.apply`."""
        if not isinstance(data, Mapping):
            raise MembershipError("malformed", "an entry must be a map")
        missing = [f for f in WIRE_FIELDS if f not in data]
        extra = sorted(str(k) for k in data if k not in WIRE_FIELDS)
        if missing or extra:
            raise MembershipError("malformed", f"fields missing {missing}, unexpected {extra}")
        entry = cls(
            channel=_text(data["channel"], "channel"),
            epoch=_int(data["epoch"], "epoch"),
            prev_hash=_bytes(data["prev"], "prev", HASH_BYTES),
            op=_text(data["op"], "op"),
            target_user=_text(data["user"], "user"),
            role=_text(data["role"], "role", empty=True),
            actor_user=_text(data["actor"], "actor"),
            actor_device=_text(data["actor_device"], "actor_device"),
            ts_ms=_int(data["ts"], "ts", minimum=0),
            sig=_bytes(data["sig"], "sig", SIG_BYTES),
        )
        check_shape(entry)
        return entry


def _text(value: object, name: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise MembershipError("malformed", f"'{name}' must be a non-empty string")
    return value


def _int(value: object, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise MembershipError("malformed", f"'{name}' must be an integer {minimum}..2^53-1")
    return value


def _bytes(value: object, name: str, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise MembershipError("malformed", f"'{name}' must be {size} bytes")
    return value


def check_shape(entry: MemberEntry) -> None:
    """The rules an entry obeys whatever the state (`malformed` otherwise): types and ranges,
    a known op, the role each op carries, and who each op may target."""
    _text(entry.channel, "channel")
    _int(entry.epoch, "epoch")
    _bytes(entry.prev_hash, "prev", HASH_BYTES)
    _text(entry.target_user, "user")
    _text(entry.role, "role", empty=True)
    _text(entry.actor_user, "actor")
    _text(entry.actor_device, "actor_device")
    _int(entry.ts_ms, "ts", minimum=0)
    _bytes(entry.sig, "sig", SIG_BYTES)
    op, role = entry.op, entry.role
    if op not in OPS:
        raise MembershipError("malformed", f"unknown op {op!r}")
    if op in ROTATING_OPS:
        if role != "":
            raise MembershipError("malformed", f"{op!r} carries no role (role must be '')")
    elif role not in ROLES:
        raise MembershipError("malformed", f"{op!r} needs a role: owner, admin or member")
    if op == "create" and role != "owner":
        raise MembershipError("malformed", "'create' makes its actor the owner (role 'owner')")
    self_only = op in ("create", "leave")
    if self_only and entry.target_user != entry.actor_user:
        raise MembershipError("malformed", f"{op!r} targets its own actor")
    if op == "remove" and entry.target_user == entry.actor_user:
        raise MembershipError("malformed", "remove someone else; to go yourself, 'leave'")


class DeviceSigner(Protocol):
    """A device key that signs without handing out its private half (E2EE v2's
    `envelope.DeviceAccount`): 64-byte Ed25519 signatures, and the 32-byte public key."""

    @property
    def ed25519(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


Signer = SigningKey | DeviceSigner


def signature(signing_key: Signer, message: bytes) -> bytes:
    if isinstance(signing_key, SigningKey):
        return signing_key.sign(message).signature
    return signing_key.sign(message)


def public_key(signing_key: Signer) -> bytes:
    if isinstance(signing_key, SigningKey):
        return bytes(signing_key.verify_key)
    return signing_key.ed25519


def sign_entry(
    signing_key: Signer,
    *,
    channel: str,
    epoch: int,
    prev_hash: bytes,
    op: str,
    target_user: str,
    role: str,
    actor_user: str,
    actor_device: str,
    ts_ms: int,
) -> MemberEntry:
    """A signed entry, checked against nothing (`sign_next` builds and checks the next entry
    of a state)."""
    statement = entry_statement(
        channel, epoch, prev_hash, op, target_user, role, actor_user, actor_device, ts_ms
    )
    sig = signature(signing_key, statement)
    return MemberEntry(
        channel, epoch, prev_hash, op, target_user, role, actor_user, actor_device, ts_ms, sig
    )
