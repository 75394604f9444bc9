"""Key transparency (docs/e2ee/transparency.md): the directory as an append-only Merkle log.

Every directory change (a user key, a device certificate, a revocation) becomes one leaf of a
log hashed exactly as RFC 9162 section 2.1 says (SHA-256, 0x00 leaf and 0x01 node prefixes,
split at the largest power of two below n). The server signs tree heads with the log's Ed25519
key; clients keep the newest head they verified, accept a new one only with a consistency
proof from it, check an inclusion proof for every entry a lookup gives them, gossip their head
inside encrypted messages, and scan the log for entries about their own user.

Server side: `MerkleLog` (append, roots, proofs), `entry`, `sign_head`.
Client side: `LogMonitor` (the client's view of the log), `verify_inclusion`,
`verify_consistency`, `verify_head`, `parse_entry`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import nacl.exceptions
from nacl.signing import SigningKey, VerifyKey

from .e2ee import CryptoError

HASH_BYTES = 32
SIG_BYTES = 64
ENTRY_TAG = "rt.v2.log-entry"
HEAD_TAG = "rt.v2.sth"
MONITOR_TAG = "rt.v2.log-monitor"
MAX_INT = 2**63 - 1  # sizes, indices and times fit a signed 64-bit integer (TypeScript: BigInt)
EMPTY_ROOT = hashlib.sha256(b"").digest()
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


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _unpack(data: bytes, what: str) -> Any:
    """msgpack bytes -> value, refusing anything but the one canonical encoding (so that one
    meaning has one leaf hash and one signed statement)."""
    if not isinstance(data, bytes):
        raise TransparencyError(f"not a {what}: not bytes")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError):  # msgpack's ExtraData, FormatError, StackError among them
        raise TransparencyError(f"not a {what}: not msgpack") from None
    if _pack(value) != data:
        raise TransparencyError(f"not a {what}: not the canonical encoding")
    return value


def _is_int(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INT


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_BYTES


# --- RFC 9162 section 2.1: hashing ----------------------------------------------------------


def leaf_hash(entry_bytes: bytes) -> bytes:
    """SHA-256(0x00 || entry): the hash of one leaf (RFC 9162 section 2.1.1)."""
    return hashlib.sha256(b"\x00" + entry_bytes).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): an interior node (RFC 9162 section 2.1.1)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): where RFC 9162 splits n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def _perfect(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class MerkleLog:
    """The server's log: the leaf hashes in order, with every complete (perfect, aligned)
    subtree's hash cached, so that an append hashes O(1) nodes amortised, a root at any size is
    O(log n) hashes and a proof O(log² n). The server stores the entries themselves; give the
    constructor the leaf hashes of the entries it already has (that rehashes the tree once, O(n)).
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        # _levels[h][i] is the hash of leaves [i * 2**h, (i + 1) * 2**h); _levels[0] the leaves
        self._levels: list[list[bytes]] = [[]]
        for h in leaf_hashes:
            self.append_hash(h)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def leaf_hash(self, index: int) -> bytes:
        return self._levels[0][index]

    def append(self, entry_bytes: bytes) -> int:
        """Adds one entry (the bytes of `entry(...)`); returns its index."""
        return self.append_hash(leaf_hash(entry_bytes))

    def append_hash(self, leaf: bytes) -> int:
        """Adds one leaf by its hash; returns its index."""
        if not _is_hash(leaf):
            raise ValueError("a leaf hash is 32 bytes")
        index = self.size
        self._levels[0].append(leaf)
        level, node = 0, leaf
        # every time a level gets an even count, its last two nodes complete a parent
        while len(self._levels[level]) % 2 == 0:
            row = self._levels[level]
            node = node_hash(row[-2], node)
            level += 1
            if level == len(self._levels):
                self._levels.append([])
            self._levels[level].append(node)
        return index

    def _hash(self, lo: int, hi: int) -> bytes:
        """MTH of leaves [lo, hi). In RFC 9162's recursion every left part is a perfect subtree
        aligned on its own size, so it is cached; only the right edge is hashed here."""
        n = hi - lo
        if n == 0:
            return EMPTY_ROOT
        if _perfect(n) and lo % n == 0:
            return self._levels[n.bit_length() - 1][lo // n]
        k = _split(n)
        return node_hash(self._hash(lo, lo + k), self._hash(lo + k, hi))

    def _check_size(self, size: int) -> None:
        if not _is_int(size) or size > self.size:
            raise ValueError(f"size {size} is not within the log (size {self.size})")

    def root(self, size: int | None = None) -> bytes:
        """The tree hash of the first `size` leaves (default: all)."""
        size = self.size if size is None else size
        self._check_size(size)
        return self._hash(0, size)

    def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf `index` in the tree of the first `size` leaves
        (RFC 9162 section 2.1.3.1, PATH(m, D[n]))."""
        size = self.size if size is None else size
        self._check_size(size)
        if not _is_int(index) or index >= size:
            raise ValueError(f"index {index} is not in a tree of size {size}")
        return self._path(index, 0, size)

    def _path(self, m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n == 1:
            return []
        k = _split(n)
        if m < k:
            return [*self._path(m, lo, lo + k), self._hash(lo + k, hi)]
        return [*self._path(m - k, lo + k, hi), self._hash(lo, lo + k)]

    def consistency(self, old: int, new: int | None = None) -> list[bytes]:
        """The proof that the tree of `old` leaves is a prefix of the tree of `new` leaves
        (RFC 9162 section 2.1.4.1, PROOF(m, D[n])); empty when old is 0 or old == new."""
        new = self.size if new is None else new
        self._check_size(new)
        if not _is_int(old) or old > new:
            raise ValueError(f"old size {old} is larger than new size {new}")
        if old == 0 or old == new:
            return []
        return self._subproof(old, 0, new, True)

    def _subproof(self, m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if whole else [self._hash(lo, hi)]
        k = _split(n)
        if m <= k:
            return [*self._subproof(m, lo, lo + k, whole), self._hash(lo + k, hi)]
        return [*self._subproof(m - k, lo + k, hi, False), self._hash(lo, lo + k)]

    def frontier(self, size: int | None = None) -> list[bytes]:
        """The hashes of the perfect subtrees that make up the first `size` leaves, largest
        first (one per set bit of size): what a client needs to start scanning the log at
        `size` without the leaves before it (`LogMonitor.start_scan`)."""
        size = self.size if size is None else size
        self._check_size(size)
        return _frontier_of(self, size)


def _frontier_of(log: MerkleLog, size: int) -> list[bytes]:
    hashes, lo = [], 0
    for bit in reversed(range(size.bit_length())):
        if size >> bit & 1:
            hashes.append(log._hash(lo, lo + (1 << bit)))
            lo += 1 << bit
    return hashes


def _fold(frontier: Sequence[bytes]) -> bytes:
    """The root of a tree given as its perfect subtrees, largest first (RFC 9162 trees are
    left-balanced: MTH = node(P0, node(P1, ... node(Pk-1, Pk))))."""
    if not frontier:
        return EMPTY_ROOT
    acc = frontier[-1]
    for h in reversed(frontier[:-1]):
        acc = node_hash(h, acc)
    return acc


def _frontier_append(frontier: list[bytes], size: int, leaf: bytes) -> None:
    """Adds one leaf to a frontier of `size` leaves, in place (the compact range of a CT
    monitor): equal-sized subtrees at the right edge merge."""
    frontier.append(leaf)
    while size & 1:
        right = frontier.pop()
        frontier[-1] = node_hash(frontier[-1], right)
        size >>= 1


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of these leaves (RFC 9162 section 2.1.1); SHA-256("") for none."""
    return MerkleLog(leaf_hashes).root()


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """The audit path of leaf `index` in the tree of the first `size` leaves."""
    return MerkleLog(leaf_hashes[:size]).inclusion(index, size)


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    """The consistency proof between the trees of the first `old_size` and `new_size` leaves."""
    return MerkleLog(leaf_hashes[:new_size]).consistency(old_size, new_size)


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes
) -> bool:
    """True when `proof` shows leaf hash `leaf` at `index` in the tree of `size` leaves whose
    root is `root_hash` (the algorithm of RFC 9162 section 2.1.3.2)."""
    if not (_is_hash(leaf) and _is_hash(root_hash) and _is_int(index) and _is_int(size)):
        return False
    if index >= size or not all(_is_hash(p) for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root_hash


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True when `proof` shows that the tree of `old_size` leaves with root `old_root` is a
    prefix of the tree of `new_size` leaves with root `new_root` (RFC 9162 section 2.1.4.2; and,
    as the RFC leaves them to the caller: equal sizes need equal roots and an empty proof, the
    empty tree is a prefix of every tree with an empty proof)."""
    if not (_is_int(old_size) and _is_int(new_size) and _is_hash(old_root)):
        return False
    if not _is_hash(new_root) or not all(_is_hash(p) for p in proof):
        return False
    if old_size > new_size:
        return False
    if old_size == new_size:
        return old_root == new_root and not proof
    if old_size == 0:
        return old_root == EMPTY_ROOT and not proof
    if not proof:
        return False
    path = list(proof)
    if _perfect(old_size):
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old_root and sr == new_root and sn == 0


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
    return _pack([ENTRY_TAG, kind, user, payload, ts])


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
    return _pack([HEAD_TAG, log_id(log_pub), size, root_hash, ts])


@dataclass(frozen=True)
class SignedTreeHead:
    """The log's signed statement that its first `size` leaves have root `root` at `ts`."""

    size: int
    root: bytes
    ts: int
    sig: bytes

    def to_wire(self) -> bytes:
        """pack([size, root, ts, sig]): how a head travels (frames, gossip, storage)."""
        return _pack([self.size, self.root, self.ts, self.sig])

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
        head's size to its size (empty for the first head). A smaller head than the current
        one, or a proof that fails, raises ForkDetected."""
        sth = self._parse(head)
        self._known(sth)
        cur = self.head
        if cur is not None and sth.size < cur.size:
            raise ForkDetected("the log went back to a smaller size", cur, sth, False)
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
        want = [1 << b for b in reversed(range(size.bit_length())) if size >> b & 1]
        if len(frontier) != len(want) or not all(_is_hash(h) for h in frontier):
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
        return _pack([MONITOR_TAG, self.log_pub, heads, self.scanned, self._frontier])

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
        if len(frontier) != bin(scanned).count("1") or not all(_is_hash(h) for h in frontier):
            raise TransparencyError("not a log monitor: bad frontier")
        monitor.scanned, monitor._frontier = scanned, frontier
        return monitor
