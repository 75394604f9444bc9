"""The shared store's other records (MongoDB): memberships, read markers, device keys,
reports and the small documents."""

from __future__ import annotations

import re
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.errors import DuplicateKeyError

from .base import Device, DeviceRef, Ix, Report
from .mongo_messages import guard


class MongoMemberships:
    def __init__(self, db: Any) -> None:
        self._col = db["memberships"]

    async def add(self, channel: str, user: str, ts: int) -> bool:
        result = await guard(
            self._col.update_one(
                {"channel": channel, "user": user}, {"$setOnInsert": {"since": ts}}, upsert=True
            )
        )
        return result.upserted_id is not None

    async def remove(self, channel: str, user: str) -> bool:
        result = await guard(self._col.delete_one({"channel": channel, "user": user}))
        return bool(result.deleted_count)

    async def is_member(self, channel: str, user: str) -> bool:
        doc = await guard(self._col.find_one({"channel": channel, "user": user}, {"_id": 1}))
        return doc is not None

    async def members(self, channel: str, limit: int, after: str | None) -> list[str]:
        query: dict[str, Any] = {"channel": channel}
        if after:
            query["user"] = {"$gt": after}
        cursor = self._col.find(query, {"user": 1, "_id": 0}).sort("user", ASCENDING).limit(limit)
        return [d["user"] for d in await guard(cursor.to_list())]

    async def shared(self, a: str, b: str, prefix: str) -> bool:
        span = {"$gte": prefix, "$lt": prefix + "\U0010ffff"}
        cursor = self._col.find({"user": a, "channel": span}, {"channel": 1, "_id": 0})
        rooms = [d["channel"] for d in await guard(cursor.to_list())]
        if not rooms:
            return False
        found = await guard(self._col.find_one({"user": b, "channel": {"$in": rooms}}, {"_id": 1}))
        return found is not None


class MongoReadMarkers:
    def __init__(self, db: Any) -> None:
        self._col = db["read_markers"]

    async def set(self, channel: str, user: str, seq: int) -> int:
        doc = await guard(
            self._col.find_one_and_update(
                {"channel": channel, "user": user},
                {"$max": {"seq": seq}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        )
        return int(doc["seq"])

    async def get(self, channel: str, user: str) -> int:
        doc = await guard(self._col.find_one({"channel": channel, "user": user}, {"seq": 1}))
        return int(doc["seq"]) if doc else 0


_DEVICE_FIELDS = {"_id": 0, "device": 1, "user": 1, "identity_key": 1, "signing_key": 1, "ts": 1}


def _device_of(doc: dict[str, Any]) -> Device:
    return Device(doc["device"], doc["user"], doc["identity_key"], doc["signing_key"], doc["ts"])


REPORT_FIELDS = (
    "id",
    "channel",
    "seq",
    "reporter",
    "sender",
    "reason",
    "ts",
    "text",
    "verified",
    "state",
)


class MongoKeys:
    """The key directory: devices and sealed channel keys, keyed by (user, device)."""

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
        await guard(
            self._devices.update_one(
                {"user": device.user, "device": device.device},
                {"$setOnInsert": doc},
                upsert=True,
            )
        )
        stored = await self.device(device.user, device.device)
        return stored or device

    async def device(self, user: str, device_id: str) -> Device | None:
        query = {"user": user, "device": device_id}
        doc = await guard(self._devices.find_one(query, _DEVICE_FIELDS))
        return _device_of(doc) if doc else None

    async def devices_of(self, users: list[str]) -> list[Device]:
        if not users:
            return []
        cursor = self._devices.find({"user": {"$in": users}}, _DEVICE_FIELDS)
        docs = await guard(cursor.sort([("user", ASCENDING), ("device", ASCENDING)]).to_list())
        return [_device_of(d) for d in docs]

    async def share(
        self,
        channel: str,
        key_id: str,
        sealed: dict[DeviceRef, bytes],
        from_device: str | None,
        ts: int,
    ) -> list[DeviceRef]:
        if not sealed:
            return []
        ops = [
            UpdateOne(
                {"channel": channel, "user": user, "device": device, "key_id": key_id},
                {"$setOnInsert": {"sealed": box, "from_device": from_device, "ts": ts}},
                upsert=True,
            )
            for (user, device), box in sealed.items()
        ]
        await guard(self._keys.bulk_write(ops, ordered=False))
        users = sorted({user for user, _ in sealed})
        held = await guard(
            self._keys.find(
                {"channel": channel, "key_id": key_id, "user": {"$in": users}},
                {"user": 1, "device": 1, "sealed": 1},
            ).to_list()
        )
        return [
            (d["user"], d["device"])
            for d in held
            if (d["user"], d["device"]) in sealed and d["sealed"] != sealed[d["user"], d["device"]]
        ]

    async def fetch(
        self, channel: str, user: str, device: str, key_id: str | None
    ) -> tuple[str, bytes] | None:
        query: dict[str, Any] = {"channel": channel, "user": user, "device": device}
        if key_id is not None:
            query["key_id"] = key_id
        doc = await guard(self._keys.find_one(query, sort=[("ts", DESCENDING)]))
        return (doc["key_id"], doc["sealed"]) if doc else None


class MongoReports:
    def __init__(self, db: Any) -> None:
        self._col = db["reports"]

    async def add(self, report: Report) -> None:
        fields = REPORT_FIELDS
        await guard(self._col.insert_one({f: getattr(report, f) for f in fields}))

    async def resolve(self, report_id: str, state: str) -> bool:
        result = await guard(
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
            for d in await guard(cursor.to_list())
        ]


class MongoDocs:
    def __init__(self, db: Any, collection: str = "docs") -> None:
        self._col = db[collection]

    @staticmethod
    def _out(d: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = dict(d["doc"])
        doc["_v"] = d["v"]
        return doc

    async def insert(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None
    ) -> dict[str, Any] | None:
        try:
            await guard(
                self._col.insert_one({"coll": coll, "key": key, "ix": ix, "v": 1, "doc": doc})
            )
        except DuplicateKeyError:
            return await self.get(coll, key)
        return None

    async def get(self, coll: str, key: str) -> dict[str, Any] | None:
        d = await guard(self._col.find_one({"coll": coll, "key": key}))
        return self._out(d) if d else None

    async def put(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None, *, version: int | None = None
    ) -> bool:
        body = {k: v for k, v in doc.items() if k != "_v"}
        if version is None:
            await guard(
                self._col.update_one(
                    {"coll": coll, "key": key},
                    {"$set": {"ix": ix, "doc": body}, "$inc": {"v": 1}},
                    upsert=True,
                )
            )
            return True
        result = await guard(
            self._col.update_one(
                {"coll": coll, "key": key, "v": version},
                {"$set": {"ix": ix, "doc": body}, "$inc": {"v": 1}},
            )
        )
        return bool(result.modified_count)

    async def prefix(self, coll: str, key_prefix: str, limit: int) -> list[dict[str, Any]]:
        cursor = self._col.find({"coll": coll, "key": {"$regex": f"^{re.escape(key_prefix)}"}})
        docs = await guard(cursor.sort("key", ASCENDING).limit(limit).to_list())
        return [self._out(d) for d in docs]

    async def count(self, coll: str, key_prefix: str, limit: int) -> int:
        query = {"coll": coll, "key": {"$regex": f"^{re.escape(key_prefix)}"}}
        return int(await guard(self._col.count_documents(query, limit=limit)))

    async def below(self, coll: str, ix: int | str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        cursor = self._col.find({"coll": coll, "ix": {"$lt": ix}})
        docs = await guard(cursor.sort("ix", ASCENDING).limit(limit).to_list())
        return [(d["key"], self._out(d)) for d in docs]

    async def find_ix(self, coll: str, ix: int | str) -> list[tuple[str, dict[str, Any]]]:
        docs = await guard(self._col.find({"coll": coll, "ix": ix}).to_list())
        return [(d["key"], self._out(d)) for d in docs]

    async def delete(self, coll: str, key: str) -> bool:
        result = await guard(self._col.delete_one({"coll": coll, "key": key}))
        return bool(result.deleted_count)

    async def delete_below(self, coll: str, ix: int | str) -> int:
        result = await guard(self._col.delete_many({"coll": coll, "ix": {"$lt": ix}}))
        return int(result.deleted_count)
