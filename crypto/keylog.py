"""The key transparency log on the server (docs/e2ee/server.md, docs/e2ee/transparency.md):
entries stored in `store.records` (`kt.entry`, one document per index), the Merkle tree of
their leaf hashes in memory, heads signed with the log's Ed25519 key.

One order across the cluster: a node appends at the next index with `insert`; when another node
took that index first, it reads that entry and tries the next one. Before answering, a node
tails the entries other nodes appended (`sync`), so its heads cover everything stored. The
first `sync` loads the whole log (the tree is rebuilt from the stored entries; nothing else is
kept per node)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

from nacl.signing import SigningKey

from realtime_safety.storage import DocStore

from .merkle import MerkleLog, leaf_hash
from .transparency import Kind, SignedTreeHead, entry, sign_head

BLOCK = 1000  # entries read at once: the keys sharing all but their last 3 digits
ENTRY_CACHE = 10_000  # entry bytes kept per node (entries never change)


def entry_key(index: int) -> str:
    return f"{index:012d}"


class KeyLog:
    """The log as one node sees it. `seed` is the log key's 32-byte Ed25519 seed from the
    configuration (RT_KT_SIGNING_KEY_FILE); without it the first node to need one generates it
    and stores it in `kt.meta` for the others."""

    def __init__(self, records: DocStore, seed: bytes | None = None, *, block: int = BLOCK) -> None:
        digits = len(str(block)) - 1
        assert block == 10**digits and digits < 12, "a block is a power of ten entries"
        self._records = records
        self._block, self._prefix_len = block, 12 - digits
        self._key = SigningKey(seed) if seed is not None else None
        self._tree = MerkleLog()
        self._by_user: dict[str, list[int]] = {}  # user -> indices of their entries, in order
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = asyncio.Lock()  # one sync or append at a time on this node

    @property
    def size(self) -> int:
        return self._tree.size

    async def signing_key(self) -> SigningKey:
        if self._key is None:
            seed = SigningKey.generate().encode()
            found = await self._records.insert("kt.meta", "signing-key", {"seed": seed})
            self._key = SigningKey(seed if found is None else found["seed"])
        return self._key

    def _add(self, index: int, data: bytes, user: str) -> None:
        assert index == self._tree.size, (index, self._tree.size)
        self._tree.append_hash(leaf_hash(data))
        self._by_user.setdefault(user, []).append(index)
        self._remember(index, data)

    def _remember(self, index: int, data: bytes) -> None:
        self._cache[index] = data
        if len(self._cache) > ENTRY_CACHE:
            self._cache.popitem(last=False)

    async def sync(self) -> int:
        """Read the entries appended since this node last looked (all of them the first time);
        returns the size."""
        async with self._lock:
            await self._tail()
        return self.size

    async def _block_of(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        """The stored entries of the block holding `index`, and the block's first index."""
        first = index - index % self._block
        key_prefix = entry_key(first)[: self._prefix_len]
        return first, await self._records.prefix("kt.entry", key_prefix, self._block)

    async def _tail(self) -> None:
        while True:
            first, docs = await self._block_of(self.size)
            for doc in docs[self.size - first :]:
                self._add(self.size, doc["entry"], doc["user"])
            if len(docs) < self._block:
                return

    async def append(self, kind: Kind, user: str, payload: bytes) -> int:
        """Append one entry after everything any node stored; returns its index."""
        async with self._lock:
            await self._tail()
            while True:
                index = self.size
                data = entry(kind, user, payload, int(time.time() * 1000))
                doc = {"entry": data, "kind": kind, "user": user}
                taken = await self._records.insert("kt.entry", entry_key(index), doc, ix=index)
                if taken is None:
                    self._add(index, data, user)
                    return index
                self._add(index, taken["entry"], taken["user"])  # another node's: next index

    async def head(self) -> SignedTreeHead:
        """A head of the whole log as stored (tailed first), signed now."""
        key = await self.signing_key()
        size = await self.sync()
        return sign_head(key, size, self._tree.root(size), int(time.time() * 1000))

    def indices(self, user: str, size: int) -> list[int]:
        """The indices of the entries about `user` below `size`, in log order."""
        return [i for i in self._by_user.get(user, ()) if i < size]

    def inclusion(self, index: int, size: int) -> list[bytes]:
        return self._tree.inclusion(index, size)

    def consistency(self, first: int, second: int) -> list[bytes]:
        return self._tree.consistency(first, second)

    def frontier(self, size: int) -> list[bytes]:
        return self._tree.frontier(size)

    async def entry(self, index: int) -> bytes:
        data = self._cache.get(index)
        if data is None:
            doc = await self._records.get("kt.entry", entry_key(index))
            if doc is None:
                raise LookupError(f"log entry {index} is missing from the store")
            data = doc["entry"]
            self._remember(index, data)
        return data

    async def entries(self, start: int, end: int) -> list[bytes]:
        """The raw entries [start, end) (end <= size)."""
        out: list[bytes] = []
        index = start
        while index < end:
            cached = self._cache.get(index)
            if cached is not None:
                out.append(cached)
                index += 1
                continue
            first, docs = await self._block_of(index)
            found = docs[index - first : end - first]
            if not found:
                raise LookupError(f"log entry {index} is missing from the store")
            for doc in found:
                self._remember(index, doc["entry"])
                out.append(doc["entry"])
                index += 1
        return out
