"""The storage interfaces: one small protocol per kind of record.

Each kind has an embedded (SQLite) and a MongoDB implementation side by side in
`storage.sqlite` and `storage.mongo`; both pass the same contract tests.
Every method raises `StoreUnavailable` when the backend cannot answer in time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

# The kinds of record a store keeps, as exported by `realtime export` (one file each).
RECORD_KINDS = (
    "messages",
    "channel_heads",
    "memberships",
    "read_markers",
    "devices",
    "channel_keys",
    "reports",
    "docs",
    "records",
)


class StoreUnavailable(Exception):
    """The backing store did not answer (down, unreachable or timed out)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One stored channel message. `body` is the client's envelope (ciphertext or, where a
    namespace allows it, plaintext); byte fields are `bytes`."""

    channel: str
    seq: int
    ts: int
    user: str
    device: str | None
    client_msg_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Appended:
    message: Message
    duplicate: bool  # True: an earlier publish with the same sender and client_msg_id


class MessageStore(Protocol):
    async def append(
        self,
        channel: str,
        user: str,
        device: str | None,
        client_msg_id: str,
        body: dict[str, Any],
        ts: int,
    ) -> Appended:
        """Store a message with the channel's next `seq` (gap-free, never reused), or return
        the message already stored under (channel, user, client_msg_id)."""
        ...

    async def last_seq(self, channel: str) -> int:
        """The highest stored `seq` of the channel, 0 if none."""
        ...

    async def after(self, channel: str, after_seq: int, limit: int) -> list[Message]:
        """Up to `limit` messages with `seq > after_seq`, ascending."""
        ...

    async def before(self, channel: str, before_seq: int | None, limit: int) -> list[Message]:
        """The newest `limit` messages with `seq < before_seq` (all if None), ascending."""
        ...

    async def redact(self, channel: str, seq: int, tombstone: dict[str, Any]) -> bool:
        """Replace a message's body with a tombstone (moderation); False if no such message."""
        ...

    async def purge(self, namespace: str, before_ts: int) -> int:
        """Delete the namespace's messages older than `before_ts` (retention). The channel's
        highest seq is remembered first, so seqs are never reused; returns how many went."""
        ...


class MembershipStore(Protocol):
    async def add(self, channel: str, user: str, ts: int) -> bool:
        """Add a member; False if they already were one."""
        ...

    async def remove(self, channel: str, user: str) -> bool:
        """Remove a member; False if they were not one."""
        ...

    async def is_member(self, channel: str, user: str) -> bool: ...

    async def members(self, channel: str, limit: int, after: str | None) -> list[str]:
        """Members in user-id order, paged by `after` (the last id of the previous page)."""
        ...

    async def shared(self, a: str, b: str, prefix: str) -> bool:
        """Whether users `a` and `b` are both members of one channel whose name starts with
        `prefix` (an index by user answers it: no scan of the channels)."""
        ...


class ReadMarkerStore(Protocol):
    async def set(self, channel: str, user: str, seq: int) -> int:
        """Move the marker forward (never back); returns the stored value."""
        ...

    async def get(self, channel: str, user: str) -> int: ...


@dataclass(frozen=True, slots=True)
class Device:
    """A registered device: its public keys, bound for good to the user who registered it.
    A device id names a device within its user's devices only: (user, device) is the key."""

    device: str
    user: str
    identity_key: bytes
    signing_key: bytes
    ts: int


# (user, device id): a device, wherever the key directory names one
DeviceRef = tuple[str, str]


class KeyStore(Protocol):
    async def register(self, device: Device) -> Device:
        """Store the device unless (user, device id) exists; returns what is stored for it
        (the caller compares it with what it asked for)."""
        ...

    async def device(self, user: str, device_id: str) -> Device | None: ...

    async def devices_of(self, users: list[str]) -> list[Device]: ...

    async def share(
        self,
        channel: str,
        key_id: str,
        sealed: dict[DeviceRef, bytes],
        from_device: str | None,
        ts: int,
    ) -> list[DeviceRef]:
        """Store sealed channel keys per device; returns the devices that already held a
        different sealed key under this key id (kept unchanged)."""
        ...

    async def fetch(
        self, channel: str, user: str, device: str, key_id: str | None
    ) -> tuple[str, bytes] | None:
        """(key_id, sealed) for the device: that key id, or the newest shared."""
        ...


@dataclass(frozen=True, slots=True)
class Report:
    id: str
    channel: str
    seq: int
    reporter: str
    sender: str
    reason: str
    ts: int
    text: str | None  # the revealed plaintext, only when franking verified it
    verified: bool
    state: str = "open"


class ReportStore(Protocol):
    async def add(self, report: Report) -> None: ...

    async def list(self, state: str, limit: int) -> list[Report]: ...

    async def resolve(self, report_id: str, state: str) -> bool:
        """Move an open report to `state` (e.g. "actioned", "dismissed")."""
        ...


Ix = int | str | None


class DocStore(Protocol):
    """Small documents for features with modest volume (alerts, their trails and deliveries,
    contacts, push tokens, the embedded job queue): a string key per collection (scannable by
    prefix), one optional range-queryable index value `ix`, and a version for compare-and-set."""

    async def insert(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None
    ) -> dict[str, Any] | None:
        """Insert unless the key exists; returns the existing document then (no write)."""
        ...

    async def get(self, coll: str, key: str) -> dict[str, Any] | None:
        """The document with its version under "_v", or None."""
        ...

    async def put(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None, *, version: int | None = None
    ) -> bool:
        """Write the document; with `version`, only if the stored version is still that
        (compare-and-set; False when another writer got there first)."""
        ...

    async def prefix(self, coll: str, key_prefix: str, limit: int) -> list[dict[str, Any]]:
        """Documents whose key starts with the prefix, in key order."""
        ...

    async def count(self, coll: str, key_prefix: str, limit: int) -> int:
        """How many documents' keys start with the prefix, counting at most `limit` (the
        documents themselves are not read)."""
        ...

    async def below(self, coll: str, ix: int | str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """(key, document) with index value < ix, lowest first."""
        ...

    async def find_ix(self, coll: str, ix: int | str) -> list[tuple[str, dict[str, Any]]]:
        """(key, document) with exactly this index value."""
        ...

    async def delete(self, coll: str, key: str) -> bool: ...

    async def delete_below(self, coll: str, ix: int | str) -> int: ...


class Store(Protocol):
    @property
    def messages(self) -> MessageStore: ...

    @property
    def memberships(self) -> MembershipStore: ...

    @property
    def read_markers(self) -> ReadMarkerStore: ...

    @property
    def keys(self) -> KeyStore: ...

    @property
    def reports(self) -> ReportStore: ...

    @property
    def docs(self) -> DocStore:
        """Alerts and what serves them (jobs, statuses, check-ins, bans, contacts)."""
        ...

    @property
    def records(self) -> DocStore:
        """The same kind of documents for chat and end-to-end encryption (the key log,
        one-time keys, to-device messages, membership logs), apart from the alerts'."""
        ...

    async def open(self) -> None:
        """Connect, create collections/tables and indexes idempotently."""
        ...

    async def ping(self) -> bool: ...

    async def schema_version(self) -> int: ...

    def dump(self, kind: str) -> AsyncIterator[dict[str, Any]]:
        """Every record of one kind as a plain document (bytes stay bytes)."""
        ...

    async def load(self, kind: str, records: list[dict[str, Any]]) -> int:
        """Insert records of one kind, skipping those already present; returns how many
        were new (import is idempotent)."""
        ...

    async def close(self) -> None: ...
