"""Key transparency (crypto/merkle.py, crypto/transparency.py, docs/e2ee/transparency.md).

The Merkle tree is checked three ways: against the Certificate Transparency reference values
(RFC 6962 test data: the same leaves, roots and proofs every CT implementation checks), against
a spec-literal copy of RFC 9162 section 2.1's recursive definitions written here (every index
and size, every pair of sizes, up to 40 leaves, and hypothesis beyond), and by mangling every
proof the ways an attacker would. The log entries, signed heads and the client's monitor get a
negative test next to each positive one. The committed vectors (tests/vectors/
transparency-v2.json) are made by `make()` from msgpack, hashlib and PyNaCl alone; regenerate
(only when the format changes) with `python tests/test_crypto_transparency.py >
tests/vectors/transparency-v2.json`."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from realtime_safety.crypto import merkle as mk
from realtime_safety.crypto import transparency as t
from realtime_safety.crypto.e2ee import CryptoError

FILE = Path(__file__).parent / "vectors" / "transparency-v2.json"


# --- RFC 9162 section 2.1, as written (the reference the module is compared with) ----------


def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def ref_k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    """MTH over leaf hashes (the leaves are hashed already)."""
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = ref_k(len(d))
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = ref_k(len(d))
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [ref_mth(d)]
    k = ref_k(len(d))
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return [] if m in (0, len(d)) else ref_subproof(m, d, True)


def shape(m: int, n: int) -> list[bool]:
    """The sides of PATH(m, D[n])'s elements (True: the sibling is on the right)."""
    if n == 1:
        return []
    k = ref_k(n)
    return [*shape(m, k), True] if m < k else [*shape(m - k, n - k), False]


def leaves(n: int, salt: int = 0) -> list[bytes]:
    return [ref_leaf(i.to_bytes(4, "big") + bytes([salt])) for i in range(n)]


# --- the Certificate Transparency reference values -------------------------------------------

CT_DATA = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
           "606162636465666768696a6b6c6d6e6f"]  # fmt: skip
CT_LEAVES = [bytes.fromhex(h) for h in CT_DATA]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
H5F = "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"
H6B = "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"
HCA = "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"
CT_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7", H5F, H6B]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b", HCA,
            CT_ROOTS[4]]),
]  # fmt: skip
CT_CONSISTENCY = [
    (2, 8, [H5F, H6B]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a", HCA,
            CT_ROOTS[4]]),
]  # fmt: skip


def test_the_tree_gives_the_certificate_transparency_reference_roots_and_proofs() -> None:
    hashes = [mk.leaf_hash(x) for x in CT_LEAVES]
    assert [mk.root(hashes[:n]).hex() for n in range(9)] == CT_ROOTS
    assert mk.EMPTY_ROOT.hex() == CT_ROOTS[0] == hashlib.sha256(b"").hexdigest()
    for index, size, proof in CT_INCLUSION:
        assert [p.hex() for p in mk.inclusion_proof(hashes, index, size)] == proof
        path = [bytes.fromhex(p) for p in proof]
        root = bytes.fromhex(CT_ROOTS[size])
        assert mk.verify_inclusion(hashes[index], index, size, path, root)
    for old, new, proof in CT_CONSISTENCY:
        assert [p.hex() for p in mk.consistency_proof(hashes, old, new)] == proof
        old_root, new_root = bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new])
        assert mk.verify_consistency(
            old, new, old_root, new_root, [bytes.fromhex(p) for p in proof]
        )


def test_leaf_and_node_hashes_use_the_rfc_prefixes() -> None:
    assert mk.leaf_hash(b"ab") == hashlib.sha256(b"\x00ab").digest()
    a, b = ref_leaf(b"a"), ref_leaf(b"b")
    assert mk.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest() != mk.node_hash(b, a)
    # a single leaf's root is its leaf hash; a leaf is never mistaken for a node
    assert mk.root([a]) == a and mk.root([a, b]) == mk.node_hash(a, b)


# --- every size up to 40 against the reference -----------------------------------------------

N = 40
LEAVES = leaves(N)
ROOTS = [ref_mth(LEAVES[:n]) for n in range(N + 1)]
LOG = mk.MerkleLog(LEAVES)


def mangled(proof: list[bytes]) -> list[list[bytes]]:
    """The ways an attacker might alter a proof: a flipped byte in each element, a truncated,
    an extended, a reordered proof."""
    out = []
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        out.append(bad)
    if proof:
        out.append(proof[:-1])
        out.append(proof[1:])
    out.append([*proof, bytes(32)])
    out.append([*proof, proof[-1] if proof else LEAVES[0]])
    if len(proof) >= 2 and proof[0] != proof[1]:
        out.append([proof[1], proof[0], *proof[2:]])
    return out


def test_every_inclusion_proof_is_the_rfc_one_and_verifies_and_no_alteration_does() -> None:
    for size in range(1, N + 1):
        root = ROOTS[size]
        assert LOG.root(size) == root
        for index in range(size):
            proof = LOG.inclusion(index, size)
            assert proof == ref_path(index, LEAVES[:size])
            assert mk.inclusion_proof(LEAVES, index, size) == proof
            leaf = LEAVES[index]
            assert mk.verify_inclusion(leaf, index, size, proof, root)
            for bad in mangled(proof):
                assert not mk.verify_inclusion(leaf, index, size, bad, root)
            for other in (index - 1, index + 1, index ^ 1, size):
                if other != index and other >= 0:
                    assert not mk.verify_inclusion(leaf, other, size, proof, root)
            for other_size in range(index + 1, N + 1):
                # a size whose tree has the same path shape is indistinguishable from the
                # proof alone (leaf 0 of 3 or of 4): the signed head binds size to root
                same_shape = shape(index, other_size) == shape(index, size)
                assert mk.verify_inclusion(leaf, index, other_size, proof, root) == same_shape
            assert not mk.verify_inclusion(LEAVES[(index + 1) % N], index, size, proof, root)
            assert not mk.verify_inclusion(leaf, index, size, proof, ROOTS[size - 1])


def test_every_consistency_proof_is_the_rfc_one_and_verifies_and_no_alteration_does() -> None:
    for new in range(0, N + 1):
        for old in range(0, new + 1):
            proof = LOG.consistency(old, new)
            assert proof == ref_proof(old, LEAVES[:new])
            assert mk.consistency_proof(LEAVES, old, new) == proof
            o, n = ROOTS[old], ROOTS[new]
            assert mk.verify_consistency(old, new, o, n, proof)
            for bad in mangled(proof):
                assert not mk.verify_consistency(old, new, o, n, bad)
            if old < new:
                assert not mk.verify_consistency(new, old, n, o, proof)  # swapped
                assert not mk.verify_consistency(old, new, n, o, proof)
            for other in (old - 1, old + 1):
                if 0 < other < new and other != old:
                    assert not mk.verify_consistency(other, new, o, n, proof)
                    assert not mk.verify_consistency(other, new, ROOTS[other], n, proof)
            if 0 < old < new < N:
                assert not mk.verify_consistency(old, new + 1, o, ROOTS[new + 1], proof)
            if 0 < old < new:
                # a fork: the same first `old` leaves' root against another tree of size new
                forked = ref_mth([*LEAVES[: new - 1], ref_leaf(b"forged")])
                assert not mk.verify_consistency(old, new, o, forked, proof)


def test_the_degenerate_cases_and_malformed_arguments() -> None:
    r = ROOTS
    assert mk.verify_consistency(4, 4, r[4], r[4], [])
    assert not mk.verify_consistency(4, 4, r[4], r[5], [])
    assert not mk.verify_consistency(4, 4, r[4], r[4], [r[1]])
    assert mk.verify_consistency(0, 8, mk.EMPTY_ROOT, r[8], [])
    assert not mk.verify_consistency(0, 8, r[1], r[8], [])
    assert not mk.verify_consistency(0, 8, mk.EMPTY_ROOT, r[8], [r[1]])
    assert not mk.verify_consistency(3, 8, r[3], r[8], [])
    proof = LOG.inclusion(5, 8)
    assert not mk.verify_inclusion(LEAVES[5], -1, 8, proof, r[8])
    assert not mk.verify_inclusion(LEAVES[5], 8, 8, proof, r[8])
    assert not mk.verify_inclusion(LEAVES[5][:31], 5, 8, proof, r[8])
    assert not mk.verify_inclusion(LEAVES[5], 5, 8, [proof[0][:31], *proof[1:]], r[8])
    assert not mk.verify_inclusion(LEAVES[5], 5, 8, proof, r[8][:31])
    assert not mk.verify_inclusion(LEAVES[0], 0, 0, [], mk.EMPTY_ROOT)
    assert mk.verify_inclusion(LEAVES[0], 0, 1, [], LEAVES[0])
    assert not mk.verify_inclusion(LEAVES[0], True, 2, LOG.inclusion(1, 2), r[2])  # bool index
    for bad in [(-1, 8), (8, 8), (0, 41)]:
        with pytest.raises(ValueError):
            LOG.inclusion(*bad)
    for bad in [(5, 3), (-1, 3), (0, 41)]:
        with pytest.raises(ValueError):
            LOG.consistency(*bad)
    with pytest.raises(ValueError):
        LOG.root(41)
    with pytest.raises(ValueError):
        mk.MerkleLog([b"short"])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.data())
def test_larger_trees_agree_with_the_reference(n: int, data: st.DataObject) -> None:
    hashes = leaves(n, salt=7)
    log = mk.MerkleLog()
    for i in range(n):
        assert log.append(i.to_bytes(4, "big") + b"\x07") == i
    size = data.draw(st.integers(1, n))
    index = data.draw(st.integers(0, size - 1))
    old = data.draw(st.integers(0, size))
    assert log.root(size) == ref_mth(hashes[:size])
    assert log.inclusion(index, size) == ref_path(index, hashes[:size])
    assert log.consistency(old, size) == ref_proof(old, hashes[:size])
    assert mk.verify_consistency(
        old, size, log.root(old), log.root(size), log.consistency(old, size)
    )


# --- the server's log ------------------------------------------------------------------------


def test_a_log_restored_from_its_leaf_hashes_is_the_log_that_was_appended() -> None:
    log = mk.MerkleLog()
    for i in range(13):
        assert log.append(b"entry %d" % i) == i and log.size == i + 1
        assert log.root() == ref_mth([ref_leaf(b"entry %d" % j) for j in range(i + 1)])
    again = mk.MerkleLog(log.leaf_hash(i) for i in range(log.size))
    assert again.root() == log.root() and again.consistency(5) == log.consistency(5, 13)
    assert again.frontier(13) == [ref_mth(again_leaves) for again_leaves in (
        [log.leaf_hash(i) for i in range(8)], [log.leaf_hash(i) for i in range(8, 12)],
        [log.leaf_hash(12)])]  # fmt: skip
    assert mk.MerkleLog().root() == mk.EMPTY_ROOT and mk.MerkleLog().frontier() == []


def test_roots_and_proofs_hash_only_the_right_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is what makes a 100k-leaf log cheap: a root hashes O(log n) nodes, a proof
    O(log² n), whatever the size."""
    log = mk.MerkleLog(leaves(5000))
    calls = 0
    real = mk.node_hash

    def counting(left: bytes, right: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return real(left, right)

    monkeypatch.setattr(mk, "node_hash", counting)
    log.root(4999)
    assert calls <= 13  # one per set bit of 4999, not 4998
    calls = 0
    log.inclusion(1234, 4999)
    log.consistency(3001, 4999)
    assert calls <= 2 * 13 * 13


def test_a_hundred_thousand_appends_and_proofs_take_well_under_a_few_seconds() -> None:
    start = time.perf_counter()
    log = mk.MerkleLog()
    for i in range(100_000):
        log.append(i.to_bytes(4, "big"))
    root = log.root()
    for i in range(0, 100_000, 9973):
        assert mk.verify_inclusion(log.leaf_hash(i), i, log.size, log.inclusion(i), root)
        proof = log.consistency(i + 1)
        assert mk.verify_consistency(i + 1, log.size, log.root(i + 1), root, proof)
    assert time.perf_counter() - start < 5


# --- entries ---------------------------------------------------------------------------------


def test_an_entry_is_the_documented_msgpack_array_and_parses_back() -> None:
    data = t.entry("device", "alice", b"\x01cert", 1_700_000_000_000)
    assert data == msgpack.packb(
        ["rt.v2.log-entry", "device", "alice", b"\x01cert", 1_700_000_000_000], use_bin_type=True
    )
    assert t.parse_entry(data) == t.LogEntry("device", "alice", b"\x01cert", 1_700_000_000_000)
    for kind in t.KINDS:
        assert t.parse_entry(t.entry(kind, "bob", b"", 0)).kind == kind


@pytest.mark.parametrize(
    "value",
    [
        ["rt.v2.log-entry", "device", "alice", b"p"],  # too short
        ["rt.v2.log-entry", "device", "alice", b"p", 1, 2],  # too long
        ["rt.v1.log-entry", "device", "alice", b"p", 1],  # wrong tag
        ["rt.v2.log-entry", "otk", "alice", b"p", 1],  # unknown kind
        ["rt.v2.log-entry", "device", "", b"p", 1],  # empty user
        ["rt.v2.log-entry", "device", b"alice", b"p", 1],  # user as bytes
        ["rt.v2.log-entry", "device", "alice", "p", 1],  # payload as text
        ["rt.v2.log-entry", "device", "alice", b"p", -1],  # negative time
        ["rt.v2.log-entry", "device", "alice", b"p", True],  # bool time
        ["rt.v2.log-entry", "device", "alice", b"p", 1.0],  # float time
        {"kind": "device"},
    ],
)
def test_anything_but_an_entry_is_refused(value: Any) -> None:
    with pytest.raises(t.TransparencyError):
        t.parse_entry(msgpack.packb(value, use_bin_type=True))


def test_non_canonical_or_trailing_bytes_are_refused() -> None:
    good = t.entry("revoke", "alice", b"p", 5)
    assert good[-1] == 5
    long_int = good[:-1] + b"\xcd\x00\x05"  # 5 as uint16: same value, another leaf hash
    assert msgpack.unpackb(long_int)[-1] == 5
    for bad in (long_int, good + b"\x00", good[:-1], b"", b"\xc1"):
        with pytest.raises(t.TransparencyError):
            t.parse_entry(bad)
    with pytest.raises(ValueError):
        t.entry("otk", "alice", b"", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        t.entry("device", "", b"", 1)
    with pytest.raises(ValueError):
        t.entry("device", "a", b"", -1)


# --- signed tree heads -----------------------------------------------------------------------

LOG_KEY = SigningKey(bytes(range(32)))
LOG_PUB = bytes(LOG_KEY.verify_key)


def test_a_head_signs_the_documented_statement_and_verifies() -> None:
    root = ROOTS[7]
    sth = t.sign_head(LOG_KEY, 7, root, 1234)
    statement = msgpack.packb(
        ["rt.v2.sth", hashlib.sha256(LOG_PUB).digest(), 7, root, 1234], use_bin_type=True
    )
    assert t.head_statement(LOG_PUB, 7, root, 1234) == statement
    LOG_KEY.verify_key.verify(statement, sth.sig)
    t.verify_head(LOG_PUB, sth)
    assert t.SignedTreeHead.from_wire(sth.to_wire()) == sth
    assert sth.to_wire() == msgpack.packb([7, root, 1234, sth.sig], use_bin_type=True)


def test_a_head_does_not_verify_with_another_key_or_any_field_changed() -> None:
    sth = t.sign_head(LOG_KEY, 7, ROOTS[7], 1234)
    other = bytes(SigningKey(bytes(range(1, 33))).verify_key)
    cases = [
        (other, sth),
        (LOG_PUB, t.SignedTreeHead(8, sth.root, sth.ts, sth.sig)),
        (LOG_PUB, t.SignedTreeHead(7, ROOTS[6], sth.ts, sth.sig)),
        (LOG_PUB, t.SignedTreeHead(7, sth.root, 1235, sth.sig)),
        (LOG_PUB, t.SignedTreeHead(7, sth.root, sth.ts, bytes([sth.sig[0] ^ 1]) + sth.sig[1:])),
        (LOG_PUB[:31], sth),
        (LOG_PUB, t.SignedTreeHead(7, sth.root, sth.ts, sth.sig[:63])),
        (LOG_PUB, t.SignedTreeHead(7, sth.root[:31], sth.ts, sth.sig)),
    ]
    for key, head in cases:
        with pytest.raises(t.TransparencyError):
            t.verify_head(key, head)


@pytest.mark.parametrize(
    "value",
    [[7, bytes(32), 1], [7, bytes(31), 1, bytes(64)], [7, bytes(32), 1, bytes(63)],
     [-1, bytes(32), 1, bytes(64)], [7, bytes(32), "1", bytes(64)],
     [7, bytes(32), 1, bytes(64), 0]],
)  # fmt: skip
def test_a_malformed_head_is_refused(value: list[Any]) -> None:
    with pytest.raises(t.TransparencyError):
        t.SignedTreeHead.from_wire(msgpack.packb(value, use_bin_type=True))


# --- the client's monitor --------------------------------------------------------------------


class Server:
    """An honest log (or one branch of a forked one): entries, heads and proofs."""

    def __init__(self, entries: list[bytes] | None = None) -> None:
        self.entries: list[bytes] = []
        self.log = mk.MerkleLog()
        for e in entries or []:
            self.add(e)

    def add(self, data: bytes) -> int:
        self.entries.append(data)
        return self.log.append(data)

    def head(self, ts: int = 1000) -> t.SignedTreeHead:
        return t.sign_head(LOG_KEY, self.log.size, self.log.root(), ts)


def events(n: int, start: int = 0, user: str = "alice") -> list[bytes]:
    users = [user, "bob", "carol"]
    return [
        t.entry("device", users[i % 3], b"cert %d" % i, 1_000 + i) for i in range(start, start + n)
    ]


def following(server: Server) -> t.LogMonitor:
    monitor = t.LogMonitor(LOG_PUB)
    monitor.update(server.head(), [])
    return monitor


def test_a_monitor_follows_an_honest_log_along_consistency_proofs() -> None:
    server = Server(events(3))
    monitor = following(server)
    for e in events(10, 3):
        old = server.log.size
        server.add(e)
        monitor.update(server.head(), server.log.consistency(old))
    assert monitor.head is not None and monitor.head.size == 13
    assert monitor.head.root == server.log.root()
    monitor.update(server.head(ts=2000), [])  # the same tree signed later: kept as fresher
    assert monitor.head.ts == 2000
    monitor.update(server.head(ts=1500), [])
    assert monitor.head.ts == 2000


def test_the_first_head_needs_an_empty_proof_and_a_good_signature() -> None:
    server = Server(events(4))
    with pytest.raises(t.TransparencyError):
        t.LogMonitor(LOG_PUB).update(server.head(), [ROOTS[1]])
    forged = t.sign_head(SigningKey(bytes(32)), 4, server.log.root(), 1)
    monitor = t.LogMonitor(LOG_PUB)
    with pytest.raises(t.TransparencyError) as info:
        monitor.update(forged, [])
    assert not isinstance(info.value, t.ForkDetected) and monitor.head is None
    assert isinstance(info.value, CryptoError)


def test_a_rollback_a_rewrite_and_a_bad_proof_are_forks_and_change_nothing() -> None:
    server = Server(events(6))
    monitor = following(server)
    smaller = t.sign_head(LOG_KEY, 5, server.log.root(5), 2000)
    with pytest.raises(t.ForkDetected) as info:
        monitor.update(smaller, [])
    assert not info.value.proven and info.value.theirs == smaller
    assert "smaller" in info.value.reason
    server.add(events(1, 6)[0])
    monitor.update(server.head(), server.log.consistency(6))
    with pytest.raises(t.TransparencyError) as stale:  # a head it verified before: only late
        monitor.update(t.sign_head(LOG_KEY, 6, server.log.root(6), 3000), [])
    assert not isinstance(stale.value, t.ForkDetected)
    before = monitor.to_bytes()
    rewritten = Server([*events(6), t.entry("device", "alice", b"attacker", 9)])
    with pytest.raises(t.ForkDetected) as info:
        monitor.update(rewritten.head(), [])
    assert info.value.proven and info.value.ours == server.head()
    assert info.value.theirs == rewritten.head()
    rewritten.add(events(1, 7)[0])
    with pytest.raises(t.ForkDetected) as info:
        monitor.update(rewritten.head(), rewritten.log.consistency(7))
    assert not info.value.proven
    server.add(events(1, 7)[0])
    proof = server.log.consistency(7)
    with pytest.raises(t.ForkDetected):
        monitor.update(server.head(), [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]])
    assert monitor.to_bytes() == before
    monitor.update(server.head(), proof)


def test_a_lookup_entry_is_accepted_only_with_its_proof_under_a_verified_head() -> None:
    server = Server(events(9))
    monitor = following(server)
    head, data = server.head(), server.entries[4]
    entry = monitor.check_inclusion(data, 4, server.log.inclusion(4), head)
    assert entry == t.parse_entry(data)
    assert monitor.check_inclusion(data, 4, server.log.inclusion(4), head.to_wire()) == entry
    bad_cases = [
        (data, 5, server.log.inclusion(4), head),  # wrong index
        (server.entries[5], 4, server.log.inclusion(4), head),  # another entry
        (data[:-1] + bytes([data[-1] ^ 1]), 4, server.log.inclusion(4), head),  # tampered
        (data, 4, server.log.inclusion(4)[:-1], head),  # truncated proof
        (data, 4, server.log.inclusion(4, 8), t.sign_head(LOG_KEY, 8, server.log.root(8), 1)),
    ]
    for args in bad_cases:
        with pytest.raises(t.TransparencyError):
            monitor.check_inclusion(*args)
    other = Server([*events(8), t.entry("device", "bob", b"attacker device", 5)])
    with pytest.raises(t.ForkDetected) as info:
        monitor.check_inclusion(other.entries[8], 8, other.log.inclusion(8), other.head())
    assert info.value.proven


def test_gossip_shows_two_users_a_forked_log() -> None:
    """The server shows alice and bob different logs (bob gets a device for alice that alice
    never made). Nothing is noticed until a head travels from one to the other."""
    common = events(5)
    honest = Server(common)
    forked = Server([*common, t.entry("device", "alice", b"attacker device", 9)])
    honest.add(t.entry("device", "carol", b"carol tablet", 9))
    alice, bob = following(honest), following(forked)
    # same size: the two heads alone prove it
    assert alice.head is not None and bob.head is not None
    with pytest.raises(t.ForkDetected) as info:
        alice.compare(bob.gossip())
    assert info.value.proven and info.value.theirs == bob.head
    # bob is one entry ahead: alice asks the server for a proof, which it cannot make
    forked.add(events(1, 20)[0])
    bob.update(forked.head(), forked.log.consistency(6))
    assert alice.compare(bob.gossip()) == "newer"
    with pytest.raises(t.ForkDetected):
        alice.reconcile(bob.gossip(), forked.log.consistency(6))  # the lying server's best try
    # bob remembers his head of alice's size: her gossip proves the fork to him at once
    with pytest.raises(t.ForkDetected) as info:
        bob.compare(alice.gossip())
    assert info.value.proven
    with pytest.raises(t.ForkDetected):
        bob.reconcile(alice.gossip(), forked.log.consistency(6))
    # carol, who only saw the honest log's first 5 entries, learns it from bob's head
    carol = t.LogMonitor(LOG_PUB)
    carol.update(t.sign_head(LOG_KEY, 5, honest.log.root(5), 900), [])
    assert carol.compare(bob.gossip()) == "newer"
    with pytest.raises(t.ForkDetected):
        carol.reconcile(bob.gossip(), honest.log.consistency(5, 6))
    carol.reconcile(alice.gossip(), honest.log.consistency(5, 6))  # the honest one is fine


def test_gossip_between_users_of_an_honest_log_agrees() -> None:
    server = Server(events(5))
    alice = following(server)
    bob = following(server)
    assert alice.compare(bob.gossip()) == "same"
    server.add(events(1, 5)[0])
    server.add(events(1, 6)[0])
    bob.update(server.head(), server.log.consistency(5))
    assert alice.compare(bob.gossip()) == "newer"
    alice.reconcile(bob.gossip(), server.log.consistency(5))
    assert alice.head == bob.head
    # carol saw the log at size 6 only: bob has not seen that head
    carol_head = t.sign_head(LOG_KEY, 6, server.log.root(6), 1500)
    assert bob.compare(carol_head.to_wire()) == "needs-proof"
    with pytest.raises(t.ForkDetected):
        bob.reconcile(carol_head, server.log.consistency(5, 7))  # the wrong proof
    bob.reconcile(carol_head, server.log.consistency(6, 7))
    assert bob.compare(carol_head.to_wire()) == "older"
    assert bob.head is not None and bob.head.size == 7
    with pytest.raises(t.TransparencyError):
        bob.compare(t.sign_head(SigningKey(bytes(32)), 7, server.log.root(), 1).to_wire())
    with pytest.raises(t.TransparencyError):
        t.LogMonitor(LOG_PUB).gossip()


def test_the_owner_sees_each_entry_about_itself_once_and_cannot_be_shown_a_partial_log() -> None:
    server = Server(events(7))
    alice = following(server)
    indexed = list(enumerate(server.entries))
    mine = alice.own_entries(indexed, "alice")
    assert [i for i, _ in mine] == [0, 3, 6] and all(e.user == "alice" for _, e in mine)
    assert alice.own_entries(indexed, "alice") == []  # nothing new
    server.add(t.entry("device", "alice", b"a device alice did not make", 50))
    server.add(events(1, 8)[0])
    alice.update(server.head(), server.log.consistency(7))
    indexed = list(enumerate(server.entries))
    # a server that hides the entry: every way of leaving it out is caught
    with pytest.raises(t.TransparencyError):
        alice.own_entries([indexed[8]], "alice")  # a gap
    with pytest.raises(t.ForkDetected):
        alice.own_entries([(7, server.entries[8]), (8, server.entries[8])], "alice")  # swapped
    with pytest.raises(t.TransparencyError):
        alice.own_entries(indexed[:8], "alice")  # stops short of any verified head
    with pytest.raises(t.TransparencyError) as info:
        alice.own_entries([indexed[7], indexed[7]], "alice")  # a repeat
    assert not isinstance(info.value, t.ForkDetected)  # a malformed answer, not evidence
    assert alice.scanned == 7
    assert alice.own_entries(indexed, "alice") == [(7, t.parse_entry(server.entries[7]))]
    assert alice.scanned == 9


def test_a_new_device_can_start_scanning_at_a_verified_head() -> None:
    server = Server(events(11))
    monitor = following(server)
    with pytest.raises(t.TransparencyError):
        monitor.start_scan(11, server.log.frontier(10))
    with pytest.raises(t.TransparencyError):
        monitor.start_scan(11, [ROOTS[1]] * 3)
    with pytest.raises(t.TransparencyError):
        monitor.start_scan(10, server.log.frontier(10))  # no head of that size
    monitor.start_scan(11, server.log.frontier(11))
    server.add(t.entry("revoke", "alice", b"revocation", 99))
    monitor.update(server.head(), server.log.consistency(11))
    assert monitor.own_entries([(11, server.entries[11])], "alice")[0][1].kind == "revoke"


def test_a_monitor_survives_storage_and_refuses_a_tampered_one() -> None:
    server = Server(events(6))
    monitor = following(server)
    monitor.own_entries(list(enumerate(server.entries)), "alice")
    server.add(events(1, 6)[0])
    monitor.update(server.head(), server.log.consistency(6))
    data = monitor.to_bytes()
    again = t.LogMonitor.from_bytes(data)
    assert again.to_bytes() == data and again.head == monitor.head and again.scanned == 6
    assert again.compare(t.sign_head(LOG_KEY, 6, server.log.root(6), 1000).to_wire()) == "older"
    value = msgpack.unpackb(data)
    forged = t.sign_head(SigningKey(bytes(32)), 7, server.log.root(), 1).to_wire()
    for i, replacement in [(1, bytes(32)), (2, [forged]), (2, value[2][:1] * 2), (3, 7),
                           (4, []), (0, "rt.v1")]:  # fmt: skip
        bad = list(value)
        bad[i] = replacement
        with pytest.raises(t.TransparencyError):
            t.LogMonitor.from_bytes(msgpack.packb(bad, use_bin_type=True))


# --- the committed vectors -------------------------------------------------------------------

INPUTS: dict[str, Any] = {
    "log_seed": bytes(range(32, 64)).hex(),
    "head_ts": 1_767_225_600_000,
    "entries": [
        {"kind": kind, "user": user, "payload": (bytes([i + 1]) * (4 + i)).hex(), "ts": ts}
        for i, (kind, user, ts) in enumerate([
            ("user-key", "alice", 1_767_225_600_001), ("device", "alice", 1_767_225_600_002),
            ("user-key", "bob", 1_767_225_600_003), ("device", "bob", 1_767_225_600_004),
            ("device", "alice", 1_767_225_600_005), ("revoke", "alice", 1_767_225_600_006),
            ("user-key", "carol", 1_767_225_600_007), ("device", "carol", 1_767_225_600_008),
        ])
    ],
}  # fmt: skip
INCLUSIONS = [(0, 1), (0, 8), (5, 8), (2, 3), (6, 7), (4, 5)]
CONSISTENCIES = [(1, 2), (1, 8), (2, 8), (3, 7), (4, 8), (6, 8), (5, 7)]


def make(i: dict[str, Any]) -> dict[str, Any]:
    """The vectors from the documented steps, with msgpack, hashlib and PyNaCl alone."""

    def pack(value: Any) -> bytes:
        data: bytes = msgpack.packb(value, use_bin_type=True)
        return data

    data = [
        pack(["rt.v2.log-entry", e["kind"], e["user"], bytes.fromhex(e["payload"]), e["ts"]])
        for e in i["entries"]
    ]
    hashes = [ref_leaf(d) for d in data]
    key = SigningKey(bytes.fromhex(i["log_seed"]))
    pub = bytes(key.verify_key)
    lid = hashlib.sha256(pub).digest()
    statement = pack(["rt.v2.sth", lid, len(hashes), ref_mth(hashes), i["head_ts"]])
    sig = key.sign(statement).signature
    return {
        "inputs": i,
        "entries": [d.hex() for d in data],
        "leaf_hashes": [h.hex() for h in hashes],
        "empty_root": ref_mth([]).hex(),
        "roots": {str(n): ref_mth(hashes[:n]).hex() for n in range(1, len(hashes) + 1)},
        "inclusion": [
            {"index": m, "size": n, "proof": [p.hex() for p in ref_path(m, hashes[:n])]}
            for m, n in INCLUSIONS
        ],
        "consistency": [
            {"old": m, "new": n, "proof": [p.hex() for p in ref_proof(m, hashes[:n])]}
            for m, n in CONSISTENCIES
        ],
        "head": {
            "log_public_key": pub.hex(),
            "log_id": lid.hex(),
            "size": len(hashes),
            "root": ref_mth(hashes).hex(),
            "ts": i["head_ts"],
            "signed": statement.hex(),
            "sig": sig.hex(),
            "wire": pack([len(hashes), ref_mth(hashes), i["head_ts"], sig]).hex(),
        },
    }


def committed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FILE.read_text())
    return data


def test_the_committed_vectors_are_what_the_documented_steps_give() -> None:
    assert committed() == make(INPUTS)


def test_the_module_reproduces_every_vector() -> None:
    v = committed()
    data = [
        t.entry(e["kind"], e["user"], bytes.fromhex(e["payload"]), e["ts"])
        for e in v["inputs"]["entries"]
    ]
    assert [d.hex() for d in data] == v["entries"]
    assert [t.parse_entry(d).user for d in data] == [e["user"] for e in v["inputs"]["entries"]]
    log = mk.MerkleLog()
    for d in data:
        log.append(d)
    assert [log.leaf_hash(n).hex() for n in range(8)] == v["leaf_hashes"]
    assert {str(n): log.root(n).hex() for n in range(1, 9)} == v["roots"]
    assert mk.root([]).hex() == v["empty_root"]
    for p in v["inclusion"]:
        proof = log.inclusion(p["index"], p["size"])
        assert [x.hex() for x in proof] == p["proof"]
        leaf = log.leaf_hash(p["index"])
        assert mk.verify_inclusion(leaf, p["index"], p["size"], proof, log.root(p["size"]))
    for p in v["consistency"]:
        proof = log.consistency(p["old"], p["new"])
        assert [x.hex() for x in proof] == p["proof"]
        old_root, new_root = log.root(p["old"]), log.root(p["new"])
        assert mk.verify_consistency(p["old"], p["new"], old_root, new_root, proof)
    h = v["head"]
    key = SigningKey(bytes.fromhex(v["inputs"]["log_seed"]))
    sth = t.sign_head(key, 8, log.root(), h["ts"])
    assert sth.sig.hex() == h["sig"] and sth.to_wire().hex() == h["wire"]
    assert t.log_id(bytes(key.verify_key)).hex() == h["log_id"]
    assert t.head_statement(bytes(key.verify_key), 8, log.root(), h["ts"]).hex() == h["signed"]
    monitor = t.LogMonitor(bytes.fromhex(h["log_public_key"]))
    monitor.update(bytes.fromhex(h["wire"]), [])
    assert monitor.check_inclusion(data[5], 5, log.inclusion(5), sth).kind == "revoke"


if __name__ == "__main__":
    json.dump(make(INPUTS), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
