"""The shared store for multi-node deployments: MongoDB through `pymongo.AsyncMongoClient`.

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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from .base import RECORD_KINDS, Appended, Device, Ix, Message, Report, StoreUnavailable

T = TypeVar("T")

_MESSAGE_FIELDS = {
    "_id": 0,
    "channel": 1,
    "seq": 1,
    "ts": 1,
    "user": 1,
    "device": 1,
    "client_msg_id": 1,
    "body": 1,
}


async def _guard(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except (DuplicateKeyError, BulkWriteError):
        raise
    except PyMongoError as exc:
        raise StoreUnavailable(f"mongodb: {type(exc).__name__}: {exc}") from exc


def _message(doc: dict[str, Any]) -> Message:
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
        doc = await _guard(
            self._col.find_one(
                {"channel": channel}, {"seq": 1, "_id": 0}, sort=[("seq", DESCENDING)]
            )
        )
        head = await _guard(self._heads.find_one({"_id": channel}))
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
                await _guard(self._col.insert_many(docs, ordered=True))
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
                p.future.set_result(Appended(_message(p.doc), duplicate=False))
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
        doc = await _guard(
            self._col.find_one(
                {"channel": channel, "user": user, "client_msg_id": client_msg_id}, _MESSAGE_FIELDS
            )
        )
        return _message(doc) if doc else None

    async def last_seq(self, channel: str) -> int:
        return await self._last(channel)

    async def after(self, channel: str, after_seq: int, limit: int) -> list[Message]:
        cursor = self._col.find({"channel": channel, "seq": {"$gt": after_seq}}, _MESSAGE_FIELDS)
        docs = await _guard(cursor.sort("seq", ASCENDING).limit(limit).to_list())
        return [_message(d) for d in docs]

    async def before(self, channel: str, before_seq: int | None, limit: int) -> list[Message]:
        query: dict[str, Any] = {"channel": channel}
        if before_seq is not None:
            query["seq"] = {"$lt": before_seq}
        cursor = self._col.find(query, _MESSAGE_FIELDS).sort("seq", DESCENDING).limit(limit)
        docs = await _guard(cursor.to_list())
        return [_message(d) for d in reversed(docs)]

    async def redact(self, channel: str, seq: int, tombstone: dict[str, Any]) -> bool:
        result = await _guard(
            self._col.update_one({"channel": channel, "seq": seq}, {"$set": {"body": tombstone}})
        )
        return bool(result.matched_count)

    async def purge(self, namespace: str, before_ts: int) -> int:
        match = {"channel": {"$regex": f"^{re.escape(namespace)}:"}, "ts": {"$lt": before_ts}}
        heads = await _guard(
            (
                await self._col.aggregate(
                    [{"$match": match}, {"$group": {"_id": "$channel", "seq": {"$max": "$seq"}}}]
                )
            ).to_list()
        )
        if heads:
            await _guard(
                self._heads.bulk_write(
                    [
                        UpdateOne({"_id": h["_id"]}, {"$max": {"last_seq": h["seq"]}}, upsert=True)
                        for h in heads
                    ],
                    ordered=False,
                )
            )
        result = await _guard(self._col.delete_many(match))
        return int(result.deleted_count)


class MongoMemberships:
    def __init__(self, db: Any) -> None:
        self._col = db["memberships"]

    async def add(self, channel: str, user: str, ts: int) -> bool:
        result = await _guard(
            self._col.update_one(
                {"channel": channel, "user": user}, {"$setOnInsert": {"since": ts}}, upsert=True
            )
        )
        return result.upserted_id is not None

    async def remove(self, channel: str, user: str) -> bool:
        result = await _guard(self._col.delete_one({"channel": channel, "user": user}))
        return bool(result.deleted_count)

    async def is_member(self, channel: str, user: str) -> bool:
        doc = await _guard(self._col.find_one({"channel": channel, "user": user}, {"_id": 1}))
        return doc is not None

    async def members(self, channel: str, limit: int, after: str | None) -> list[str]:
        query: dict[str, Any] = {"channel": channel}
        if after:
            query["user"] = {"$gt": after}
        cursor = self._col.find(query, {"user": 1, "_id": 0}).sort("user", ASCENDING).limit(limit)
        return [d["user"] for d in await _guard(cursor.to_list())]


class MongoReadMarkers:
    def __init__(self, db: Any) -> None:
        self._col = db["read_markers"]

    async def set(self, channel: str, user: str, seq: int) -> int:
        doc = await _guard(
            self._col.find_one_and_update(
                {"channel": channel, "user": user},
                {"$max": {"seq": seq}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        )
        return int(doc["seq"])

    async def get(self, channel: str, user: str) -> int:
        doc = await _guard(self._col.find_one({"channel": channel, "user": user}, {"seq": 1}))
        return int(doc["seq"]) if doc else 0


async def _v1(db: Any) -> None:
    """The initial collections and indexes."""
    messages = db["messages"]
    await messages.create_index(
        [("channel", ASCENDING), ("seq", ASCENDING)], unique=True, name="channel_seq"
    )
    await messages.create_index(
        [("channel", ASCENDING), ("user", ASCENDING), ("client_msg_id", ASCENDING)],
        unique=True,
        name="idempotency",
    )
    await messages.create_index([("channel", ASCENDING), ("ts", ASCENDING)], name="channel_ts")
    for name in ("memberships", "read_markers"):
        await db[name].create_index(
            [("channel", ASCENDING), ("user", ASCENDING)], unique=True, name="channel_user"
        )


async def _v2(db: Any) -> None:
    """The key directory and member reports."""
    await db["devices"].create_index([("device", ASCENDING)], unique=True, name="device")
    await db["devices"].create_index([("user", ASCENDING)], name="user")
    await db["channel_keys"].create_index(
        [("channel", ASCENDING), ("device", ASCENDING), ("key_id", ASCENDING)],
        unique=True,
        name="channel_device_key",
    )
    await db["channel_keys"].create_index(
        [("channel", ASCENDING), ("device", ASCENDING), ("ts", DESCENDING)], name="newest"
    )
    await db["reports"].create_index([("id", ASCENDING)], unique=True, name="id")
    await db["reports"].create_index([("state", ASCENDING), ("ts", ASCENDING)], name="state_ts")


# Schema migrations: entry i brings a database from version i to version i + 1. Each must be
# idempotent (index creation is), since a node can die between a step and the version bump.
async def _v3(db: Any) -> None:
    """Small documents (alerts and their trails, deliveries, contacts, push tokens)."""
    await db["docs"].create_index(
        [("coll", ASCENDING), ("key", ASCENDING)], unique=True, name="coll_key"
    )
    await db["docs"].create_index([("coll", ASCENDING), ("ix", ASCENDING)], name="coll_ix")


MIGRATIONS: list[Callable[[Any], Awaitable[None]]] = [_v1, _v2, _v3]
SCHEMA_VERSION = len(MIGRATIONS)

# Export/import: the fields of each kind's plain documents, and their unique key.
_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (
        ("channel", "seq", "ts", "user", "device", "client_msg_id", "body"),
        ("channel", "seq"),
    ),
    "channel_heads": (("channel", "last_seq"), ("channel",)),
    "memberships": (("channel", "user", "since"), ("channel", "user")),
    "read_markers": (("channel", "user", "seq"), ("channel", "user")),
    "devices": (("device", "user", "identity_key", "signing_key", "ts"), ("device",)),
    "channel_keys": (
        ("channel", "device", "key_id", "sealed", "from_device", "ts"),
        ("channel", "device", "key_id"),
    ),
    "reports": (
        ("id", "channel", "seq", "reporter", "sender", "reason", "ts", "text", "verified", "state"),
        ("id",),
    ),
    "docs": (("coll", "key", "ix", "v", "doc"), ("coll", "key")),
}


_DEVICE_FIELDS = {"_id": 0, "device": 1, "user": 1, "identity_key": 1, "signing_key": 1, "ts": 1}


def _device_of(doc: dict[str, Any]) -> Device:
    return Device(doc["device"], doc["user"], doc["identity_key"], doc["signing_key"], doc["ts"])


class MongoKeys:
    def __init__(self, db: Any) -> None:
        self._devices = db["devices"]
        self._keys = db["channel_keys"]

    async def register(self, device: Device) -> Device:
        doc = {
            "device": device.device,
            "user": device.user,
            "identity_key": device.identity_key,
            "signing_key": device.signing_key,
            "ts": device.ts,
        }
        await _guard(
            self._devices.update_one({"device": device.device}, {"$setOnInsert": doc}, upsert=True)
        )
        stored = await self.device(device.device)
        return stored or device

    async def device(self, device_id: str) -> Device | None:
        doc = await _guard(self._devices.find_one({"device": device_id}, _DEVICE_FIELDS))
        return _device_of(doc) if doc else None

    async def devices_of(self, users: list[str]) -> list[Device]:
        if not users:
            return []
        cursor = self._devices.find({"user": {"$in": users}}, _DEVICE_FIELDS)
        docs = await _guard(cursor.sort([("user", ASCENDING), ("device", ASCENDING)]).to_list())
        return [_device_of(d) for d in docs]

    async def share(
        self, channel: str, key_id: str, sealed: dict[str, bytes], from_device: str | None, ts: int
    ) -> list[str]:
        if not sealed:
            return []
        ops = [
            UpdateOne(
                {"channel": channel, "device": device, "key_id": key_id},
                {"$setOnInsert": {"sealed": box, "from_device": from_device, "ts": ts}},
                upsert=True,
            )
            for device, box in sealed.items()
        ]
        await _guard(self._keys.bulk_write(ops, ordered=False))
        held = await _guard(
            self._keys.find(
                {"channel": channel, "key_id": key_id, "device": {"$in": list(sealed)}},
                {"device": 1, "sealed": 1},
            ).to_list()
        )
        return [d["device"] for d in held if d["sealed"] != sealed[d["device"]]]

    async def fetch(
        self, channel: str, device: str, key_id: str | None
    ) -> tuple[str, bytes] | None:
        query: dict[str, Any] = {"channel": channel, "device": device}
        if key_id is not None:
            query["key_id"] = key_id
        doc = await _guard(self._keys.find_one(query, sort=[("ts", DESCENDING)]))
        return (doc["key_id"], doc["sealed"]) if doc else None


class MongoReports:
    def __init__(self, db: Any) -> None:
        self._col = db["reports"]

    async def add(self, report: Report) -> None:
        fields = _KINDS["reports"][0]
        await _guard(self._col.insert_one({f: getattr(report, f) for f in fields}))

    async def resolve(self, report_id: str, state: str) -> bool:
        result = await _guard(
            self._col.update_one({"id": report_id, "state": "open"}, {"$set": {"state": state}})
        )
        return bool(result.modified_count)

    async def list(self, state: str, limit: int) -> list[Report]:
        cursor = self._col.find({"state": state}, {"_id": 0}).sort("ts", ASCENDING).limit(limit)
        return [
            Report(
                d["id"],
                d["channel"],
                d["seq"],
                d["reporter"],
                d["sender"],
                d["reason"],
                d["ts"],
                d.get("text"),
                bool(d["verified"]),
                d["state"],
            )
            for d in await _guard(cursor.to_list())
        ]


class MongoDocs:
    def __init__(self, db: Any) -> None:
        self._col = db["docs"]

    @staticmethod
    def _out(d: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = dict(d["doc"])
        doc["_v"] = d["v"]
        return doc

    async def insert(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None
    ) -> dict[str, Any] | None:
        try:
            await _guard(
                self._col.insert_one({"coll": coll, "key": key, "ix": ix, "v": 1, "doc": doc})
            )
        except DuplicateKeyError:
            return await self.get(coll, key)
        return None

    async def get(self, coll: str, key: str) -> dict[str, Any] | None:
        d = await _guard(self._col.find_one({"coll": coll, "key": key}))
        return self._out(d) if d else None

    async def put(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None, *, version: int | None = None
    ) -> bool:
        body = {k: v for k, v in doc.items() if k != "_v"}
        if version is None:
            await _guard(
                self._col.update_one(
                    {"coll": coll, "key": key},
                    {"$set": {"ix": ix, "doc": body}, "$inc": {"v": 1}},
                    upsert=True,
                )
            )
            return True
        result = await _guard(
            self._col.update_one(
                {"coll": coll, "key": key, "v": version},
                {"$set": {"ix": ix, "doc": body}, "$inc": {"v": 1}},
            )
        )
        return bool(result.modified_count)

    async def prefix(self, coll: str, key_prefix: str, limit: int) -> list[dict[str, Any]]:
        cursor = self._col.find({"coll": coll, "key": {"$regex": f"^{re.escape(key_prefix)}"}})
        docs = await _guard(cursor.sort("key", ASCENDING).limit(limit).to_list())
        return [self._out(d) for d in docs]

    async def below(self, coll: str, ix: int | str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        cursor = self._col.find({"coll": coll, "ix": {"$lt": ix}})
        docs = await _guard(cursor.sort("ix", ASCENDING).limit(limit).to_list())
        return [(d["key"], self._out(d)) for d in docs]

    async def find_ix(self, coll: str, ix: int | str) -> list[tuple[str, dict[str, Any]]]:
        docs = await _guard(self._col.find({"coll": coll, "ix": ix}).to_list())
        return [(d["key"], self._out(d)) for d in docs]

    async def delete(self, coll: str, key: str) -> bool:
        result = await _guard(self._col.delete_one({"coll": coll, "key": key}))
        return bool(result.deleted_count)

    async def delete_below(self, coll: str, ix: int | str) -> int:
        result = await _guard(self._col.delete_many({"coll": coll, "ix": {"$lt": ix}}))
        return int(result.deleted_count)


class MongoStore:
    """History, sequences, idempotency, memberships and read markers shared by all nodes."""

    def __init__(
        self,
        uri: str,
        db_name: str,
        *,
        timeout_s: float = 5.0,
        write_concern: str | int = "majority",
        journal: bool = True,
    ) -> None:
        self._client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri,
            serverSelectionTimeoutMS=int(timeout_s * 1000),
            connectTimeoutMS=int(timeout_s * 1000),
            timeoutMS=int(timeout_s * 1000),
            appname="realtime",
            tz_aware=False,
        )
        self._db = self._client.get_database(
            db_name, write_concern=WriteConcern(w=write_concern, j=journal)
        )
        self.messages = MongoMessages(self._db)
        self.memberships = MongoMemberships(self._db)
        self.read_markers = MongoReadMarkers(self._db)
        self.keys = MongoKeys(self._db)
        self.reports = MongoReports(self._db)
        self.docs = MongoDocs(self._db)

    async def open(self) -> None:
        meta = self._db["meta"]
        version = await self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"database has schema version {version}, newer than this server "
                f"({SCHEMA_VERSION}): upgrade the server"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await _guard(MIGRATIONS[target - 1](self._db))
            await _guard(
                meta.update_one({"_id": "schema"}, {"$max": {"version": target}}, upsert=True)
            )

    async def schema_version(self) -> int:
        doc = await _guard(self._db["meta"].find_one({"_id": "schema"}))
        return int(doc.get("version", 0)) if doc else 0

    async def ping(self) -> bool:
        try:
            await self._client.admin.command("ping")
        except PyMongoError:
            return False
        return True

    async def dump(self, kind: str) -> AsyncIterator[dict[str, Any]]:
        assert kind in RECORD_KINDS, kind
        fields, key = _KINDS[kind]
        if kind == "channel_heads":  # keyed by _id = channel
            cursor = self._db[kind].find({}).sort("_id", ASCENDING)
            async for doc in cursor:
                yield {"channel": doc["_id"], "last_seq": doc["last_seq"]}
            return
        cursor = self._db[kind].find({}, {"_id": 0}).sort([(k, ASCENDING) for k in key])
        async for doc in cursor:
            yield {f: doc.get(f) for f in fields}

    async def load(self, kind: str, records: list[dict[str, Any]]) -> int:
        assert kind in RECORD_KINDS, kind
        fields, key = _KINDS[kind]
        if not records:
            return 0
        ops = []
        for r in records:
            doc = {f: r.get(f) for f in fields}
            if kind == "channel_heads":
                ops.append(
                    UpdateOne(
                        {"_id": doc["channel"]},
                        {"$max": {"last_seq": doc["last_seq"]}},
                        upsert=True,
                    )
                )
            else:
                ops.append(UpdateOne({k: doc[k] for k in key}, {"$setOnInsert": doc}, upsert=True))
        result = await _guard(self._db[kind].bulk_write(ops, ordered=False))
        return int(result.upserted_count)

    async def close(self) -> None:
        await self._client.close()
