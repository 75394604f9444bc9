"""RFC 9162 section 2.1 Merkle trees for key transparency (docs/e2ee/transparency.md).

The log's hashing exactly as the RFC says (SHA-256, 0x00 leaf and 0x01 node prefixes, split at
the largest power of two below n): `leaf_hash`, `node_hash`, `root`; the server's `MerkleLog`
(append, roots, inclusion and consistency proofs, frontiers) and the list-based
`inclusion_proof`, `consistency_proof`; the client's checks `verify_inclusion` and
`verify_consistency`. The entries, signed tree heads and the client's `LogMonitor` are in
`crypto/transparency.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_BYTES = 32
MAX_INT = 2**63 - 1  # sizes, indices and times fit a signed 64-bit integer (TypeScript: BigInt)
EMPTY_ROOT = hashlib.sha256(b"").digest()


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
        hashes, lo = [], 0
        for width in _subtree_sizes(size):
            hashes.append(self._hash(lo, lo + width))
            lo += width
        return hashes


def _subtree_sizes(size: int) -> list[int]:
    """The sizes of the perfect subtrees that make up a tree of `size` leaves, largest first."""
    return [1 << bit for bit in reversed(range(size.bit_length())) if size >> bit & 1]


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
