"""The shared store for multi-node deployments: MongoDB through `pymongo.AsyncMongoClient`
(the seq design is in `storage.mongo_messages`), its migrations and export/import."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, UpdateOne
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.write_concern import WriteConcern

from .base import RECORD_KINDS, StoreUnavailable
from .mongo_messages import MongoMessages, guard
from .mongo_records import (
    REPORT_FIELDS,
    MongoDocs,
    MongoKeys,
    MongoMemberships,
    MongoReadMarkers,
    MongoReports,
)


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


async def _v4(db: Any) -> None:
    """Device ids scoped per user (issue 23: a first-come global id could be squatted): the
    key directory is keyed by (user, device). Sealed keys get the `user` field of their
    device, the unique indexes move to (user, device); no document is removed or rewritten
    beyond that field. Idempotent: a key that has its `user` is not touched again."""
    devices, keys = db["devices"], db["channel_keys"]
    await devices.create_index(
        [("user", ASCENDING), ("device", ASCENDING)], unique=True, name="user_device"
    )
    async for d in devices.find({}, {"user": 1, "device": 1}):
        await keys.update_many(
            {"device": d["device"], "user": {"$exists": False}}, {"$set": {"user": d["user"]}}
        )
    await keys.create_index(
        [("channel", ASCENDING), ("user", ASCENDING), ("device", ASCENDING), ("key_id", ASCENDING)],
        unique=True,
        name="channel_user_device_key",
    )
    await keys.create_index(
        [("channel", ASCENDING), ("user", ASCENDING), ("device", ASCENDING), ("ts", DESCENDING)],
        name="newest_of_device",
    )
    # the old unique indexes are what refused a second user's device of the same id
    for col, name in ((devices, "device"), (keys, "channel_device_key")):
        try:
            await col.drop_index(name)
        except OperationFailure as exc:
            if exc.code != 27:  # IndexNotFound: gone already (another node migrated too)
                raise


async def _v5(db: Any) -> None:
    """Chat's and end-to-end encryption's documents, apart from the alerts' (`docs`)."""
    await db["records"].create_index(
        [("coll", ASCENDING), ("key", ASCENDING)], unique=True, name="coll_key"
    )
    await db["records"].create_index([("coll", ASCENDING), ("ix", ASCENDING)], name="coll_ix")


async def _v6(db: Any) -> None:
    """Memberships by user (who shares a room with whom, for presence's visibility)."""
    await db["memberships"].create_index(
        [("user", ASCENDING), ("channel", ASCENDING)], name="user_channel"
    )


MIGRATIONS: list[Callable[[Any], Awaitable[None]]] = [_v1, _v2, _v3, _v4, _v5, _v6]
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
    "devices": (("device", "user", "identity_key", "signing_key", "ts"), ("user", "device")),
    "channel_keys": (
        ("channel", "user", "device", "key_id", "sealed", "from_device", "ts"),
        ("channel", "user", "device", "key_id"),
    ),
    "reports": (REPORT_FIELDS, ("id",)),
    "docs": (("coll", "key", "ix", "v", "doc"), ("coll", "key")),
    "records": (("coll", "key", "ix", "v", "doc"), ("coll", "key")),
}


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
        self.records = MongoDocs(self._db, "records")

    async def open(self) -> None:
        meta = self._db["meta"]
        version = await self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"database has schema version {version}, newer than this server "
                f"({SCHEMA_VERSION}): upgrade the server"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await guard(MIGRATIONS[target - 1](self._db))
            await guard(
                meta.update_one({"_id": "schema"}, {"$max": {"version": target}}, upsert=True)
            )

    async def schema_version(self) -> int:
        doc = await guard(self._db["meta"].find_one({"_id": "schema"}))
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
            if kind == "channel_keys" and doc["user"] is None:  # exported before v4
                owners = await guard(
                    self._db["devices"].distinct("user", {"device": doc["device"]})
                )
                if len(owners) != 1:
                    continue
                doc["user"] = owners[0]
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
        if not ops:
            return 0
        result = await guard(self._db[kind].bulk_write(ops, ordered=False))
        return int(result.upserted_count)

    async def close(self) -> None:
        await self._client.close()
