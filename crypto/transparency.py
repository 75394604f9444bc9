"""Key transparency (docs/e2ee/transparency.md): the directory as an append-only Merkle log.

Every directory change (a user key, a device certificate, a revocation) becomes one leaf of a
log hashed exactly as RFC 9162 section 2.1 says (SHA-256, 0x00 leaf and 0x01 node prefixes,
split at the largest power of two below n). The server signs tree heads with the log's Ed25519
key; clients keep the newest head they verified, accept a new one only with a consistency
proof from it, check an inclusion proof for every entry a lookup gives them, gossip their head
inside encrypted messages, and scan the log for entries about their own user.

This module offers the log's entries (`LogEntry`, `entry`, `parse_entry`), signed tree heads
(`SignedTreeHead`, `log_id`, `head_statement`, `sign_head`, `verify_head`), the client's view of
the log (`LogMonitor`) and the errors (`TransparencyError`, `ForkDetected`). The tree hashing,
the server's `MerkleLog` and the proof checks are in `crypto/merkle.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import nacl.exceptions
from nacl.signing import SigningKey, VerifyKey

from .e2ee import CryptoError, pack
from .merkle import (
    EMPTY_ROOT,
    _fold,
    _frontier_append,
    _is_hash,
    _is_int,
    _subtree_sizes,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)

SIG_BYTES = 64
ENTRY_TAG = "rt.v2.log-entry"
HEAD_TAG = "rt.v2.sth"
MONITOR_TAG = "rt.v2.log-monitor"
HISTORY = 256  # how many earlier verified heads a monitor remembers (to answer gossip cheaply)

Kind = Literal["user-key", "device", "revoke"]
Comparison = Literal["same", "older", "newer", "needs-proof"]
KINDS: tuple[Kind, ...] = ("user-key", "device", "revoke")


class TransparencyError(CryptoError):
    """Something from the log that does not verify (bad signature, malformed bytes, a proof for
    the wrong head). Not by itself evidence against the server."""


class ForkDetected(TransparencyError):
    """The log shown to this client is not one append-only line: `ours` and `theirs` are the two
    signed heads that disagree. `proven` is True when the two heads alone prove it to anyone
    (same size, different roots, both signed by the log key); otherwise (a smaller head than one
    already seen, a consistency proof that fails, entries that do not make the head's root) the
    heads are kept as evidence and a third party can ask the log for the proof it cannot give."""

    def __init__(
        self, reason: str, ours: SignedTreeHead, theirs: SignedTreeHead, proven: bool
    ) -> None:
        super().__init__(reason)
        self.ours, self.theirs, self.proven = ours, theirs, proven


def _unpack(data: bytes, what: str) -> Any:
    """msgpack bytes -> value, refusing anything but the one canonical encoding (so that one
    meaning has one leaf hash and one signed statement)."""
    if not isinstance(data, bytes):
        raise TransparencyError(f"not a {what}: not bytes")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError):  # msgpack's ExtraData, FormatError, StackError among them
        raise TransparencyError(f"not a {what}: not msgpack") from None
    if pack(value) != data:
        raise TransparencyError(f"not a {what}: not the canonical encoding")
    return value


# --- entries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """One directory event: `payload` is the signed statement's wire bytes from the identity
    module (a user key, a device certificate, a revocation), opaque to the log."""

    kind: Kind
    user: str
    payload: bytes
    ts: int


def entry(kind: Kind, user: str, payload: bytes, ts: int) -> bytes:
    """The leaf bytes of one directory event: pack(["rt.v2.log-entry", kind, user, payload, ts])."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if not isinstance(user, str) or not user:
        raise ValueError("user must be a non-empty string")
    if not isinstance(payload, bytes):
        raise ValueError("payload must be bytes")
    if not _is_int(ts):
        raise ValueError("ts must be an integer of milliseconds >= 0")
    return pack([ENTRY_TAG, kind, user, payload, ts])


def parse_entry(data: bytes) -> LogEntry:
    """The event in leaf bytes; TransparencyError unless they are exactly what `entry` makes."""
    value = _unpack(data, "log entry")
    if not (isinstance(value, list) and len(value) == 5 and value[0] == ENTRY_TAG):
        raise TransparencyError("not a log entry: wrong shape or tag")
    _, kind, user, payload, ts = value
    if kind not in KINDS or not isinstance(user, str) or not user:
        raise TransparencyError("not a log entry: bad kind or user")
    if not isinstance(payload, bytes) or not _is_int(ts):
        raise TransparencyError("not a log entry: bad payload or ts")
    return LogEntry(kind, user, payload, ts)


# --- signed tree heads -----------------------------------------------------------------------


def log_id(log_pub: bytes) -> bytes:
    """SHA-256 of the log's Ed25519 public key: names the log inside every signed head."""
    return hashlib.sha256(log_pub).digest()


def head_statement(log_pub: bytes, size: int, root_hash: bytes, ts: int) -> bytes:
    """What a head's signature signs: pack(["rt.v2.sth", log_id, size, root, ts])."""
    return pack([HEAD_TAG, log_id(log_pub), size, root_hash, ts])


@dataclass(frozen=True)
class SignedTreeHead:
    """The log's signed statement that its first `size` leaves have root `root` at `ts`."""

    size: int
    root: bytes
    ts: int
    sig: bytes

    def to_wire(self) -> bytes:
        """pack([size, root, ts, sig]): how a head travels (frames, gossip, storage)."""
        return pack([self.size, self.root, self.ts, self.sig])

    @classmethod
    def from_wire(cls, data: bytes) -> SignedTreeHead:
        """Parses (does not verify) a head; TransparencyError when malformed."""
        value = _unpack(data, "tree head")
        if not (isinstance(value, list) and len(value) == 4):
            raise TransparencyError("not a tree head: wrong shape")
        size, root_hash, ts, sig = value
        if not (_is_int(size) and _is_hash(root_hash) and _is_int(ts)):
            raise TransparencyError("not a tree head: bad size, root or ts")
        if not (isinstance(sig, bytes) and len(sig) == SIG_BYTES):
            raise TransparencyError("not a tree head: bad signature length")
        return cls(size, root_hash, ts, sig)

    def same_tree(self, other: SignedTreeHead) -> bool:
        return (self.size, self.root) == (other.size, other.root)


def sign_head(signing_key: SigningKey, size: int, root_hash: bytes, ts: int) -> SignedTreeHead:
    """The server signs the head of its log (size leaves, root `root_hash`, time `ts`)."""
    if not (_is_int(size) and _is_hash(root_hash) and _is_int(ts)):
        raise ValueError("size and ts must be integers >= 0 and root 32 bytes")
    statement = head_statement(bytes(signing_key.verify_key), size, root_hash, ts)
    return SignedTreeHead(size, root_hash, ts, signing_key.sign(statement).signature)


def verify_head(log_pub: bytes, sth: SignedTreeHead) -> None:
    """Raises TransparencyError unless `sth` is signed by the log key `log_pub` (32 bytes)."""
    if not (isinstance(log_pub, bytes) and len(log_pub) == 32):
        raise TransparencyError("the log key must be 32 bytes")
    if not (_is_int(sth.size) and _is_hash(sth.root) and _is_int(sth.ts)):
        raise TransparencyError("malformed tree head")
    statement = head_statement(log_pub, sth.size, sth.root, sth.ts)
    try:
        VerifyKey(log_pub).verify(statement, sth.sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        raise TransparencyError("tree head signature does not verify") from None


# --- the client's view -----------------------------------------------------------------------


class LogMonitor:
    """A client's view of the log: the newest head it verified (and the last `HISTORY` ones),
    moved forward only along consistency proofs; plus how far it has scanned the log for
    entries about its own user (a compact frontier, so a scan needs no earlier leaves).

    Every method that finds two heads that cannot both be honest raises ForkDetected; nothing
    is changed in the monitor when a method raises."""

    def __init__(self, log_pub: bytes) -> None:
        if not (isinstance(log_pub, bytes) and len(log_pub) == 32):
            raise ValueError("the log key must be 32 bytes")
        self.log_pub = log_pub
        self.head: SignedTreeHead | None = None
        self._history: dict[int, SignedTreeHead] = {}  # size -> head, verified and on our line
        self.scanned = 0  # leaves [0, scanned) were checked by own_entries / start_scan
        self._frontier: list[bytes] = []

    # heads

    def _parse(self, head: SignedTreeHead | bytes) -> SignedTreeHead:
        sth = SignedTreeHead.from_wire(head) if isinstance(head, bytes) else head
        verify_head(self.log_pub, sth)
        return sth

    def _remember(self, sth: SignedTreeHead) -> None:
        """Adds a verified head on our line; the same tree signed later replaces the earlier
        signature (fresher); the largest becomes the current head."""
        seen = self._history.get(sth.size)
        if seen is None or sth.ts > seen.ts:
            self._history[sth.size] = sth
        while len(self._history) > HISTORY:
            del self._history[min(self._history)]
        self.head = self._history[max(self._history)]

    def _known(self, sth: SignedTreeHead) -> SignedTreeHead | None:
        """A head of the same size that we verified before; ForkDetected if its root differs."""
        seen = self._history.get(sth.size)
        if seen is not None and seen.root != sth.root:
            raise ForkDetected("two signed heads of one size with different roots", seen, sth, True)
        return seen

    def update(self, head: SignedTreeHead | bytes, proof: Sequence[bytes]) -> None:
        """Moves to `head` (the server's answer), given the consistency proof from the current
        head's size to its size (empty for the first head). A proof that fails, or a smaller
        head than the current one that it has not verified before (a rollback), raises
        ForkDetected; a smaller one it verified before raises TransparencyError (stale)."""
        sth = self._parse(head)
        known = self._known(sth)
        cur = self.head
        if cur is not None and sth.size < cur.size:
            if known is not None:  # on our line already: a lagging answer, not a fork
                raise TransparencyError("stale head: older than the current one")
            raise ForkDetected("rollback: the log went back to a smaller size", cur, sth, False)
        old_size, old_root = (0, EMPTY_ROOT) if cur is None else (cur.size, cur.root)
        if not verify_consistency(old_size, sth.size, old_root, sth.root, proof):
            if cur is None:
                raise TransparencyError("the first head needs an empty consistency proof")
            raise ForkDetected("consistency proof does not verify", cur, sth, False)
        self._remember(sth)

    def _require_head(self) -> SignedTreeHead:
        if self.head is None:
            raise TransparencyError("no verified head yet: call update first")
        return self.head

    def check_inclusion(
        self, entry_bytes: bytes, index: int, proof: Sequence[bytes], head: SignedTreeHead | bytes
    ) -> LogEntry:
        """Checks that `entry_bytes` is leaf `index` under `head`, which must be a head this
        monitor has verified (call `update` with the lookup's head first); returns the entry."""
        sth = self._parse(head)
        if self._known(sth) is None:
            raise TransparencyError("not a head this monitor has verified: update first")
        parsed = parse_entry(entry_bytes)
        if not verify_inclusion(leaf_hash(entry_bytes), index, sth.size, proof, sth.root):
            raise TransparencyError("inclusion proof does not verify")
        return parsed

    def gossip(self) -> bytes:
        """The current head's wire bytes, to put inside an encrypted message."""
        return self._require_head().to_wire()

    def compare(self, other_wire_head: bytes) -> Comparison:
        """Where a head gossiped by someone else stands against ours (its signature is
        verified first): "same" (our head's tree), "older" (a tree we already verified),
        "newer" (larger than ours: ask the server for consistency(ours.size, its size) and call
        `reconcile`), "needs-proof" (smaller, not one we remember: ask for consistency(its size,
        ours.size) and call `reconcile`). A head of a size we know with another root raises
        ForkDetected (proven)."""
        sth = self._parse(other_wire_head)
        if self._known(sth) is not None:
            return "same" if self.head is not None and sth.same_tree(self.head) else "older"
        if self.head is None or sth.size > self.head.size:
            return "newer"
        return "needs-proof"

    def reconcile(self, other_head: SignedTreeHead | bytes, proof: Sequence[bytes]) -> None:
        """Checks a gossiped head against ours with the consistency proof between the smaller
        and the larger of the two (from the server); a larger head becomes ours. ForkDetected
        when the proof fails or the roots of one size differ."""
        sth = self._parse(other_head)
        if self._known(sth) is not None:
            return
        cur = self.head
        if cur is None or sth.size > cur.size:
            self.update(sth, proof)
            return
        if not verify_consistency(sth.size, cur.size, sth.root, cur.root, proof):
            raise ForkDetected("gossiped head is not a prefix of ours", cur, sth, False)
        self._remember(sth)

    # the owner's monitoring

    def start_scan(self, size: int, frontier: Sequence[bytes]) -> None:
        """Skips the scan to `size` (a new device need not read the whole history), given the
        log's `MerkleLog.frontier(size)`, which must fold to the root of a verified head of
        that size. Entries before `size` are then trusted unseen."""
        if self.scanned:
            raise TransparencyError("already scanning: a scan only moves forward")
        sth = self._history.get(size)
        if sth is None:
            raise TransparencyError("no verified head of that size")
        if len(frontier) != len(_subtree_sizes(size)) or not all(_is_hash(h) for h in frontier):
            raise TransparencyError("frontier has the wrong shape for that size")
        if _fold(frontier) != sth.root:
            raise TransparencyError("frontier does not make the head's root")
        self.scanned, self._frontier = size, list(frontier)

    def own_entries(
        self, entries_with_index: Iterable[tuple[int, bytes]], user: str
    ) -> list[tuple[int, LogEntry]]:
        """The entries about `user` among log leaves this monitor has not scanned yet, for the
        owner to ask "did I make this?". `entries_with_index` must be every leaf from
        `scanned` (earlier ones are skipped) up to the size of a verified head; their hashes
        must rebuild that head's root, so the server cannot hide an entry from its owner."""
        frontier, scanned = list(self._frontier), self.scanned
        found: list[tuple[int, LogEntry]] = []
        for index, data in entries_with_index:
            if index < self.scanned:
                continue  # already scanned
            if index != scanned:
                raise TransparencyError(f"entries skip from {scanned} to {index}")
            parsed = parse_entry(data)
            _frontier_append(frontier, scanned, leaf_hash(data))
            scanned += 1
            if parsed.user == user:
                found.append((index, parsed))
        if scanned == self.scanned:
            return []
        sth = self._history.get(scanned)
        if sth is None:
            raise TransparencyError(f"no verified head of size {scanned}: update first")
        if _fold(frontier) != sth.root:
            raise ForkDetected("the entries do not make the head's root", sth, sth, False)
        self.scanned, self._frontier = scanned, frontier
        return found

    # persistence

    def to_bytes(self) -> bytes:
        """The monitor's state, for the client's own storage:
        pack(["rt.v2.log-monitor", log_pub, [head wire...], scanned, [frontier hash...]])."""
        heads = [h.to_wire() for _, h in sorted(self._history.items())]
        return pack([MONITOR_TAG, self.log_pub, heads, self.scanned, self._frontier])

    @classmethod
    def from_bytes(cls, data: bytes) -> LogMonitor:
        """Restores a monitor saved by `to_bytes`, re-verifying every head it holds."""
        value = _unpack(data, "log monitor")
        if not (isinstance(value, list) and len(value) == 5 and value[0] == MONITOR_TAG):
            raise TransparencyError("not a log monitor: wrong shape or tag")
        _, log_pub, heads, scanned, frontier = value
        if not (isinstance(log_pub, bytes) and len(log_pub) == 32 and isinstance(heads, list)):
            raise TransparencyError("not a log monitor: bad key or heads")
        monitor = cls(log_pub)
        for wire in heads:
            if not isinstance(wire, bytes):
                raise TransparencyError("not a log monitor: bad head")
            sth = monitor._parse(wire)
            if sth.size in monitor._history:
                raise TransparencyError("not a log monitor: two heads of one size")
            monitor._remember(sth)
        if not (_is_int(scanned) and isinstance(frontier, list)):
            raise TransparencyError("not a log monitor: bad scan state")
        if len(frontier) != len(_subtree_sizes(scanned)) or not all(_is_hash(h) for h in frontier):
            raise TransparencyError("not a log monitor: bad frontier")
        monitor.scanned, monitor._frontier = scanned, frontier
        return monitor
