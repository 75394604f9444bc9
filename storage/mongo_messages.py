"""The shared store's messages (MongoDB).

Sequence design (gap-free, never reused, safe when a node dies mid-publish): a message's `seq`
exists only as the `_id`-like unique key (channel, seq) of its own document. A node inserts the
message with `seq = last + 1`; if another node took that seq first, the unique index refuses the
insert and the node re-reads the channel's last seq and tries again. Nothing is reserved before
the insert, so a node that dies mid-publish leaves no hole. Each node caches the last seq per
channel and groups its own concurrent publishes to a channel into one ordered `insert_many`,
so the common case is one round trip per publish (or per group) and retries happen only when
two nodes publish to the same channel at the same moment.
Idempotency: a second unique index on (channel, user, client_msg_id) refuses a retried publish;
the node then returns the stored original. The idempotency record is the message itself, so the
two can never disagree, and it lives as long as the message (see retention).

Retention deletes old messages but first records each channel's highest seq in `channel_heads`;
the last seq of a channel is the larger of its newest message and its head, so a seq is never
reused even after every message of a channel expired.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from .base import Appended, Message, StoreUnavailable

T = TypeVar("T")

MESSAGE_FIELDS = {
    "_id": 0,
    "channel": 1,
    "seq": 1,
    "ts": 1,
    "user": 1,
    "device": 1,
    "client_msg_id": 1,
    "body": 1,
}


async def guard(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except (DuplicateKeyError, BulkWriteError):
        raise
    except PyMongoError as exc:
        raise StoreUnavailable(f"mongodb: {type(exc).__name__}: {exc}") from exc


def message_of(doc: dict[str, Any]) -> Message:
    return Message(
        doc["channel"],
        doc["seq"],
        doc["ts"],
        doc["user"],
        doc.get("device"),
        doc["client_msg_id"],
        doc["body"],
    )


@dataclass(slots=True)
class _Pending:
    doc: dict[str, Any]
    future: asyncio.Future[Appended]


class MongoMessages:
    """Appends are grouped per channel: while one insert is in flight, further publishes to the
    channel queue up and go together in one ordered `insert_many` with consecutive seqs."""

    def __init__(self, db: Any, max_batch: int = 256, cache_size: int = 100_000) -> None:
        self._col = db["messages"]
        self._heads = db["channel_heads"]
        self._queues: dict[str, list[_Pending]] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}  # owned: one per busy channel
        self._last_seqs: OrderedDict[str, int] = OrderedDict()
        self._cache_size = cache_size
        self.max_batch = max_batch
        self.batches = 0  # insert round trips made (for the storage benchmark)

    async def _last(self, channel: str) -> int:
        doc = await guard(
            self._col.find_one(
                {"channel": channel}, {"seq": 1, "_id": 0}, sort=[("seq", DESCENDING)]
            )
        )
        head = await guard(self._heads.find_one({"_id": channel}))
        return max(int(doc["seq"]) if doc else 0, int(head["last_seq"]) if head else 0)

    def _remember(self, channel: str, seq: int) -> None:
        self._last_seqs[channel] = seq
        self._last_seqs.move_to_end(channel)
        if len(self._last_seqs) > self._cache_size:
            self._last_seqs.popitem(last=False)

    async def append(
        self,
        channel: str,
        user: str,
        device: str | None,
        client_msg_id: str,
        body: dict[str, Any],
        ts: int,
    ) -> Appended:
        doc = {
            "channel": channel,
            "seq": 0,
            "ts": ts,
            "user": user,
            "device": device,
            "client_msg_id": client_msg_id,
            "body": body,
        }
        loop = asyncio.get_running_loop()
        pending = _Pending(doc, loop.create_future())
        self._queues.setdefault(channel, []).append(pending)
        if channel not in self._flushers:
            self._flushers[channel] = loop.create_task(
                self._flush(channel), name=f"mongo-append:{channel}"
            )
        return await asyncio.shield(pending.future)

    async def _flush(self, channel: str) -> None:
        queue = self._queues[channel]
        try:
            while queue:
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                try:
                    await self._insert(channel, batch)
                except Exception as exc:
                    self._last_seqs.pop(channel, None)
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
        except BaseException:
            for p in queue:
                if not p.future.done():
                    p.future.set_exception(StoreUnavailable("append cancelled"))
            raise
        finally:
            del self._flushers[channel]
            if not queue:
                del self._queues[channel]

    async def _insert(self, channel: str, batch: list[_Pending]) -> None:
        """Insert with consecutive seqs after the channel's last. On a unique-index refusal
        at position k, the first k are stored; the refused one is either a retried publish
        (its original is returned) or lost a race for its seq to another node (re-read the
        last seq and go on with the rest)."""
        last = self._last_seqs.get(channel)
        if last is None:
            last = await self._last(channel)
        remaining = batch
        for _ in range(1000):
            if not remaining:
                return
            docs = []
            for i, p in enumerate(remaining):
                p.doc.pop("_id", None)
                p.doc["seq"] = last + 1 + i
                docs.append(p.doc)
            refused: int | None = None
            try:
                await guard(self._col.insert_many(docs, ordered=True))
                inserted = len(docs)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors") or []
                if (
                    not errors
                    or errors[0].get("code") != 11000
                    or exc.details.get("writeConcernErrors")
                ):
                    raise StoreUnavailable(f"mongodb: insert failed: {exc.details}") from exc
                inserted = int(exc.details.get("nInserted", 0))
                refused = int(errors[0]["index"])
            self.batches += 1
            for p in remaining[:inserted]:
                p.doc.pop("_id", None)
                p.future.set_result(Appended(message_of(p.doc), duplicate=False))
            if inserted:
                last = remaining[inserted - 1].doc["seq"]
                self._remember(channel, last)
            remaining = remaining[inserted:]
            if refused is not None and remaining:
                first = remaining[0].doc
                original = await self._original(channel, first["user"], first["client_msg_id"])
                if original is not None:
                    remaining[0].future.set_result(Appended(original, duplicate=True))
                    remaining = remaining[1:]
                else:
                    last = await self._last(channel)  # another node took the seq
        raise StoreUnavailable(f"could not assign a seq on {channel}: contention")

    async def _original(self, channel: str, user: str, client_msg_id: str) -> Message | None:
        doc = await guard(
            self._col.find_one(
                {"channel": channel, "user": user, "client_msg_id": client_msg_id}, MESSAGE_FIELDS
            )
        )
        return message_of(doc) if doc else None

    async def last_seq(self, channel: str) -> int:
        return await self._last(channel)

    async def after(self, channel: str, after_seq: int, limit: int) -> list[Message]:
        cursor = self._col.find({"channel": channel, "seq": {"$gt": after_seq}}, MESSAGE_FIELDS)
        docs = await guard(cursor.sort("seq", ASCENDING).limit(limit).to_list())
        return [message_of(d) for d in docs]

    async def before(self, channel: str, before_seq: int | None, limit: int) -> list[Message]:
        query: dict[str, Any] = {"channel": channel}
        if before_seq is not None:
            query["seq"] = {"$lt": before_seq}
        cursor = self._col.find(query, MESSAGE_FIELDS).sort("seq", DESCENDING).limit(limit)
        docs = await guard(cursor.to_list())
        return [message_of(d) for d in reversed(docs)]

    async def redact(self, channel: str, seq: int, tombstone: dict[str, Any]) -> bool:
        result = await guard(
            self._col.update_one({"channel": channel, "seq": seq}, {"$set": {"body": tombstone}})
        )
        return bool(result.matched_count)

    async def purge(self, namespace: str, before_ts: int) -> int:
        match = {"channel": {"$regex": f"^{re.escape(namespace)}:"}, "ts": {"$lt": before_ts}}
        heads = await guard(
            (
                await self._col.aggregate(
                    [{"$match": match}, {"$group": {"_id": "$channel", "seq": {"$max": "$seq"}}}]
                )
            ).to_list()
        )
        if heads:
            await guard(
                self._heads.bulk_write(
                    [
                        UpdateOne({"_id": h["_id"]}, {"$max": {"last_seq": h["seq"]}}, upsert=True)
                        for h in heads
                    ],
                    ordered=False,
                )
            )
        result = await guard(self._col.delete_many(match))
        return int(result.deleted_count)
