"""The embedded store's other records: memberships, read markers, device keys, reports and
the small documents (alerts, deliveries, contacts, the embedded job queue)."""

from __future__ import annotations

import sqlite3
from typing import Any

import msgpack

from .base import Device, DeviceRef, Ix, Report
from .sqlite_db import Db, transaction


class SqliteMemberships:
    def __init__(self, writer: Db, reader: Db) -> None:
        self._w = writer
        self._r = reader

    async def add(self, channel: str, user: str, ts: int) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT OR IGNORE INTO memberships (channel, user, since) VALUES (?,?,?)",
                (channel, user, ts),
            )
            return cur.rowcount == 1

        return await self._w.run(q)

    async def remove(self, channel: str, user: str) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute("DELETE FROM memberships WHERE channel=? AND user=?", (channel, user))
            return cur.rowcount == 1

        return await self._w.run(q)

    async def is_member(self, channel: str, user: str) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM memberships WHERE channel=? AND user=?", (channel, user)
            ).fetchone()
            return row is not None

        return await self._r.run(q)

    async def members(self, channel: str, limit: int, after: str | None) -> list[str]:
        def q(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT user FROM memberships WHERE channel=? AND user>? ORDER BY user LIMIT ?",
                (channel, after or "", limit),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._r.run(q)

    async def shared(self, a: str, b: str, prefix: str) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM memberships x JOIN memberships y ON y.channel = x.channel "
                "AND y.user = ? WHERE x.user = ? AND x.channel >= ? AND x.channel < ? LIMIT 1",
                (b, a, prefix, prefix + "\U0010ffff"),
            ).fetchone()
            return row is not None

        return await self._r.run(q)


class SqliteReadMarkers:
    def __init__(self, writer: Db, reader: Db) -> None:
        self._w = writer
        self._r = reader

    async def set(self, channel: str, user: str, seq: int) -> int:
        def q(db: sqlite3.Connection) -> int:
            row = db.execute(
                "INSERT INTO read_markers (channel, user, seq) VALUES (?,?,?) "
                "ON CONFLICT (channel, user) DO UPDATE SET seq=MAX(seq, excluded.seq) "
                "RETURNING seq",
                (channel, user, seq),
            ).fetchone()
            return int(row[0])

        return await self._w.run(q)

    async def get(self, channel: str, user: str) -> int:
        def q(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT seq FROM read_markers WHERE channel=? AND user=?", (channel, user)
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._r.run(q)


class SqliteKeys:
    """The key directory: devices and sealed channel keys, keyed by (user, device)."""

    def __init__(self, writer: Db, reader: Db) -> None:
        self._w = writer
        self._r = reader

    async def register(self, device: Device) -> Device:
        def q(db: sqlite3.Connection) -> Device:
            db.execute(
                "INSERT OR IGNORE INTO user_devices "
                "(user, device, identity_key, signing_key, ts) VALUES (?,?,?,?,?)",
                (device.user, device.device, device.identity_key, device.signing_key, device.ts),
            )
            return _device(db, device.user, device.device) or device

        return await self._w.run(q)

    async def device(self, user: str, device_id: str) -> Device | None:
        return await self._r.run(lambda db: _device(db, user, device_id))

    async def devices_of(self, users: list[str]) -> list[Device]:
        marks = ",".join("?" * len(users))

        def q(db: sqlite3.Connection) -> list[Device]:
            rows = db.execute(
                "SELECT device, user, identity_key, signing_key, ts FROM user_devices "
                f"WHERE user IN ({marks}) ORDER BY user, device",
                users,
            ).fetchall()
            return [Device(*r) for r in rows]

        return await self._r.run(q) if users else []

    async def share(
        self,
        channel: str,
        key_id: str,
        sealed: dict[DeviceRef, bytes],
        from_device: str | None,
        ts: int,
    ) -> list[DeviceRef]:
        def q(db: sqlite3.Connection) -> list[DeviceRef]:
            def work() -> list[DeviceRef]:
                conflicts = []
                for (user, device), box in sealed.items():
                    cur = db.execute(
                        "INSERT OR IGNORE INTO user_channel_keys "
                        "(channel, user, device, key_id, sealed, from_device, ts) "
                        "VALUES (?,?,?,?,?,?,?)",
                        (channel, user, device, key_id, box, from_device, ts),
                    )
                    if cur.rowcount == 0:
                        (held,) = db.execute(
                            "SELECT sealed FROM user_channel_keys "
                            "WHERE channel=? AND user=? AND device=? AND key_id=?",
                            (channel, user, device, key_id),
                        ).fetchone()
                        if held != box:
                            conflicts.append((user, device))
                return conflicts

            return transaction(db, work)

        return await self._w.run(q)

    async def fetch(
        self, channel: str, user: str, device: str, key_id: str | None
    ) -> tuple[str, bytes] | None:
        def q(db: sqlite3.Connection) -> tuple[str, bytes] | None:
            where = "WHERE channel=? AND user=? AND device=?"
            if key_id is None:
                row = db.execute(
                    f"SELECT key_id, sealed FROM user_channel_keys {where} "
                    "ORDER BY ts DESC LIMIT 1",
                    (channel, user, device),
                ).fetchone()
            else:
                row = db.execute(
                    f"SELECT key_id, sealed FROM user_channel_keys {where} AND key_id=?",
                    (channel, user, device, key_id),
                ).fetchone()
            return (row[0], row[1]) if row else None

        return await self._r.run(q)


def _device(db: sqlite3.Connection, user: str, device_id: str) -> Device | None:
    row = db.execute(
        "SELECT device, user, identity_key, signing_key, ts FROM user_devices "
        "WHERE user=? AND device=?",
        (user, device_id),
    ).fetchone()
    return Device(*row) if row else None


REPORT_COLUMNS = "id, channel, seq, reporter, sender, reason, ts, text, verified, state"


class SqliteReports:
    def __init__(self, writer: Db, reader: Db) -> None:
        self._w = writer
        self._r = reader

    async def add(self, report: Report) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT INTO reports ({REPORT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    report.id,
                    report.channel,
                    report.seq,
                    report.reporter,
                    report.sender,
                    report.reason,
                    report.ts,
                    report.text,
                    int(report.verified),
                    report.state,
                ),
            )

        await self._w.run(q)

    async def resolve(self, report_id: str, state: str) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE reports SET state=? WHERE id=? AND state='open'", (state, report_id)
            )
            return cur.rowcount == 1

        return await self._w.run(q)

    async def list(self, state: str, limit: int) -> list[Report]:
        def q(db: sqlite3.Connection) -> list[Report]:
            rows = db.execute(
                f"SELECT {REPORT_COLUMNS} FROM reports WHERE state=? ORDER BY ts LIMIT ?",
                (state, limit),
            ).fetchall()
            return [
                Report(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9])
                for r in rows
            ]

        return await self._r.run(q)


class SqliteDocs:
    def __init__(self, writer: Db, reader: Db, table: str = "docs") -> None:
        self._w = writer
        self._r = reader
        self._t = table

    async def insert(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None
    ) -> dict[str, Any] | None:
        blob = msgpack.packb(doc, use_bin_type=True)

        def q(db: sqlite3.Connection) -> dict[str, Any] | None:
            cur = db.execute(
                f"INSERT OR IGNORE INTO {self._t} (coll, key, ix, v, doc) VALUES (?,?,?,1,?)",
                (coll, key, ix, blob),
            )
            if cur.rowcount == 1:
                return None
            row = db.execute(
                f"SELECT v, doc FROM {self._t} WHERE coll=? AND key=?", (coll, key)
            ).fetchone()
            return _doc(row)

        return await self._w.run(q)

    async def get(self, coll: str, key: str) -> dict[str, Any] | None:
        def q(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute(
                f"SELECT v, doc FROM {self._t} WHERE coll=? AND key=?", (coll, key)
            ).fetchone()
            return _doc(row) if row else None

        return await self._r.run(q)

    async def put(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None, *, version: int | None = None
    ) -> bool:
        body = {k: v for k, v in doc.items() if k != "_v"}
        blob = msgpack.packb(body, use_bin_type=True)

        def q(db: sqlite3.Connection) -> bool:
            if version is None:
                db.execute(
                    f"INSERT INTO {self._t} (coll, key, ix, v, doc) VALUES (?,?,?,1,?) "
                    "ON CONFLICT (coll, key) DO UPDATE SET ix=excluded.ix, v=v+1, "
                    "doc=excluded.doc",
                    (coll, key, ix, blob),
                )
                return True
            cur = db.execute(
                f"UPDATE {self._t} SET ix=?, v=v+1, doc=? WHERE coll=? AND key=? AND v=?",
                (ix, blob, coll, key, version),
            )
            return cur.rowcount == 1

        return await self._w.run(q)

    async def prefix(self, coll: str, key_prefix: str, limit: int) -> list[dict[str, Any]]:
        def q(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                f"SELECT v, doc FROM {self._t} "
                "WHERE coll=? AND key>=? AND key<? ORDER BY key LIMIT ?",
                (coll, key_prefix, key_prefix + "\U0010ffff", limit),
            ).fetchall()
            return [_doc(r) for r in rows]

        return await self._r.run(q)

    async def count(self, coll: str, key_prefix: str, limit: int) -> int:
        def q(db: sqlite3.Connection) -> int:
            row = db.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM {self._t} "
                "WHERE coll=? AND key>=? AND key<? LIMIT ?)",
                (coll, key_prefix, key_prefix + "\U0010ffff", limit),
            ).fetchone()
            return int(row[0])

        return await self._r.run(q)

    async def below(self, coll: str, ix: int | str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        def q(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
            rows = db.execute(
                f"SELECT key, v, doc FROM {self._t} WHERE coll=? AND ix<? ORDER BY ix LIMIT ?",
                (coll, ix, limit),
            ).fetchall()
            return [(r[0], _doc(r[1:])) for r in rows]

        return await self._r.run(q)

    async def find_ix(self, coll: str, ix: int | str) -> list[tuple[str, dict[str, Any]]]:
        def q(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
            rows = db.execute(
                f"SELECT key, v, doc FROM {self._t} WHERE coll=? AND ix=?", (coll, ix)
            ).fetchall()
            return [(r[0], _doc(r[1:])) for r in rows]

        return await self._r.run(q)

    async def delete(self, coll: str, key: str) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute(f"DELETE FROM {self._t} WHERE coll=? AND key=?", (coll, key))
            return cur.rowcount == 1

        return await self._w.run(q)

    async def delete_below(self, coll: str, ix: int | str) -> int:
        def q(db: sqlite3.Connection) -> int:
            return db.execute(f"DELETE FROM {self._t} WHERE coll=? AND ix<?", (coll, ix)).rowcount

        return await self._w.run(q)


def _doc(row: tuple[Any, ...]) -> dict[str, Any]:
    version, blob = row
    doc: dict[str, Any] = msgpack.unpackb(blob, raw=False)
    doc["_v"] = version
    return doc
