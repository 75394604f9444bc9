"""The embedded store: one SQLite file in WAL mode under RT_DATA_DIR.

All writes run on one dedicated thread with one connection and `synchronous=FULL`, so `seq`
assignment is serialised and nothing is acknowledged before it is on disk: a SIGKILL of the
process loses nothing acknowledged. Appends are group-committed: every append that arrives
while a commit is in progress joins the next transaction, so N concurrent publishers share one
fsync instead of paying N. Reads run on a second thread with its own connection (WAL lets them
proceed while a write commits).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from .base import RECORD_KINDS, Appended, Device, Ix, Message, Report, StoreUnavailable

T = TypeVar("T")

# Schema migrations: entry i brings a database from version i to version i + 1. Each runs in
# one transaction with the version bump, so a crash mid-upgrade leaves the old version intact.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS messages (
        channel TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
        user TEXT NOT NULL, device TEXT, client_msg_id TEXT NOT NULL, body BLOB NOT NULL,
        PRIMARY KEY (channel, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
        ON messages (channel, user, client_msg_id);
    CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts);
    CREATE TABLE IF NOT EXISTS channel_heads (
        channel TEXT PRIMARY KEY, last_seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS memberships (
        channel TEXT NOT NULL, user TEXT NOT NULL, since INTEGER NOT NULL,
        PRIMARY KEY (channel, user)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS read_markers (
        channel TEXT NOT NULL, user TEXT NOT NULL, seq INTEGER NOT NULL,
        PRIMARY KEY (channel, user)
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE IF NOT EXISTS devices (
        device TEXT PRIMARY KEY, user TEXT NOT NULL, identity_key BLOB NOT NULL,
        signing_key BLOB NOT NULL, ts INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS devices_user ON devices (user);
    CREATE TABLE IF NOT EXISTS channel_keys (
        channel TEXT NOT NULL, device TEXT NOT NULL, key_id TEXT NOT NULL, sealed BLOB NOT NULL,
        from_device TEXT, ts INTEGER NOT NULL, PRIMARY KEY (channel, device, key_id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS channel_keys_newest ON channel_keys (channel, device, ts);
    CREATE TABLE IF NOT EXISTS reports (
        id TEXT PRIMARY KEY, channel TEXT NOT NULL, seq INTEGER NOT NULL,
        reporter TEXT NOT NULL, sender TEXT NOT NULL, reason TEXT NOT NULL, ts INTEGER NOT NULL,
        text TEXT, verified INTEGER NOT NULL, state TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS reports_state ON reports (state, ts);
    """,
    """
    CREATE TABLE IF NOT EXISTS docs (
        coll TEXT NOT NULL, key TEXT NOT NULL, ix, v INTEGER NOT NULL, doc BLOB NOT NULL,
        PRIMARY KEY (coll, key)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS docs_ix ON docs (coll, ix);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = "channel, seq, ts, user, device, client_msg_id, body"
_LAST_SEQ = (
    "SELECT MAX(COALESCE((SELECT MAX(seq) FROM messages WHERE channel=?1), 0),"
    " COALESCE((SELECT last_seq FROM channel_heads WHERE channel=?1), 0))"
)


def _row(row: tuple[Any, ...]) -> Message:
    channel, seq, ts, user, device, cmid, body = row
    return Message(channel, seq, ts, user, device, cmid, msgpack.unpackb(body, raw=False))


def _namespace_range(namespace: str) -> tuple[str, str]:
    """Channel names of a namespace sort between `ns:` and `ns;` (';' follows ':')."""
    return f"{namespace}:", f"{namespace};"


class _Db:
    """A connection owned by one thread; every call runs there."""

    def __init__(self, path: Path, name: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{name}")
        self._conn: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: fn(self.connect()))
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def close(self) -> None:
        def _close(_: sqlite3.Connection) -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._conn is not None:
            await self.run(_close)
        self._executor.shutdown(wait=True)


@dataclass(slots=True)
class _Pending:
    channel: str
    user: str
    device: str | None
    client_msg_id: str
    body: dict[str, Any]
    blob: bytes
    ts: int
    future: asyncio.Future[Appended]


def _transaction(db: sqlite3.Connection, work: Callable[[], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


class SqliteMessages:
    def __init__(self, writer: _Db, reader: _Db, max_batch: int = 256) -> None:
        self._w = writer
        self._r = reader
        self._queue: list[_Pending] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None  # owned; ends when the queue is empty
        self._max_batch = max_batch
        self.batches = 0  # group commits made (for the storage benchmark)

    async def append(
        self,
        channel: str,
        user: str,
        device: str | None,
        client_msg_id: str,
        body: dict[str, Any],
        ts: int,
    ) -> Appended:
        loop = asyncio.get_running_loop()
        blob = msgpack.packb(body, use_bin_type=True)
        pending = _Pending(
            channel, user, device, client_msg_id, body, blob, ts, loop.create_future()
        )
        self._queue.append(pending)
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush(), name="sqlite-group-commit")
        return await asyncio.shield(pending.future)

    async def _flush(self) -> None:
        """Commit queued appends in groups until the queue is empty."""
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                try:
                    results = await self._w.run(lambda db, b=batch: self._commit(db, b))  # type: ignore[misc]
                except BaseException as exc:
                    error = exc if isinstance(exc, Exception) else StoreUnavailable(repr(exc))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self.batches += 1
                for p, result in zip(batch, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(result)
        finally:
            self._flushing = False

    def _commit(self, db: sqlite3.Connection, batch: list[_Pending]) -> list[Appended]:
        def work() -> list[Appended]:
            results = []
            for p in batch:
                found = db.execute(
                    f"SELECT {_COLUMNS} FROM messages "
                    "WHERE channel=? AND user=? AND client_msg_id=?",
                    (p.channel, p.user, p.client_msg_id),
                ).fetchone()
                if found:
                    results.append(Appended(_row(found), duplicate=True))
                    continue
                (last,) = db.execute(_LAST_SEQ, (p.channel,)).fetchone()
                seq = last + 1
                db.execute(
                    f"INSERT INTO messages ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                    (p.channel, seq, p.ts, p.user, p.device, p.client_msg_id, p.blob),
                )
                message = Message(p.channel, seq, p.ts, p.user, p.device, p.client_msg_id, p.body)
                results.append(Appended(message, duplicate=False))
            return results

        return _transaction(db, work)

    async def last_seq(self, channel: str) -> int:
        return await self._r.run(lambda db: int(db.execute(_LAST_SEQ, (channel,)).fetchone()[0]))

    async def after(self, channel: str, after_seq: int, limit: int) -> list[Message]:
        def q(db: sqlite3.Connection) -> list[Message]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE channel=? AND seq>? ORDER BY seq LIMIT ?",
                (channel, after_seq, limit),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self._r.run(q)

    async def before(self, channel: str, before_seq: int | None, limit: int) -> list[Message]:
        bound = before_seq if before_seq is not None else 2**62

        def q(db: sqlite3.Connection) -> list[Message]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE channel=? AND seq<? "
                "ORDER BY seq DESC LIMIT ?",
                (channel, bound, limit),
            ).fetchall()
            return [_row(r) for r in reversed(rows)]

        return await self._r.run(q)

    async def redact(self, channel: str, seq: int, tombstone: dict[str, Any]) -> bool:
        blob = msgpack.packb(tombstone, use_bin_type=True)

        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE messages SET body=? WHERE channel=? AND seq=?", (blob, channel, seq)
            )
            return cur.rowcount == 1

        return await self._w.run(q)

    async def purge(self, namespace: str, before_ts: int) -> int:
        low, high = _namespace_range(namespace)

        def q(db: sqlite3.Connection) -> int:
            def work() -> int:
                # Remember each channel's highest seq first, so that seqs are never reused
                # even when every message of a channel has expired.
                db.execute(
                    "INSERT INTO channel_heads (channel, last_seq) "
                    "SELECT channel, MAX(seq) FROM messages "
                    "WHERE channel>=? AND channel<? AND ts<? GROUP BY channel "
                    "ON CONFLICT (channel) DO UPDATE "
                    "SET last_seq=MAX(last_seq, excluded.last_seq)",
                    (low, high, before_ts),
                )
                cur = db.execute(
                    "DELETE FROM messages WHERE channel>=? AND channel<? AND ts<?",
                    (low, high, before_ts),
                )
                return cur.rowcount

            return _transaction(db, work)

        return await self._w.run(q)


class SqliteMemberships:
    def __init__(self, writer: _Db, reader: _Db) -> None:
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


class SqliteReadMarkers:
    def __init__(self, writer: _Db, reader: _Db) -> None:
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
    def __init__(self, writer: _Db, reader: _Db) -> None:
        self._w = writer
        self._r = reader

    async def register(self, device: Device) -> Device:
        def q(db: sqlite3.Connection) -> Device:
            db.execute(
                "INSERT OR IGNORE INTO devices (device, user, identity_key, signing_key, ts) "
                "VALUES (?,?,?,?,?)",
                (device.device, device.user, device.identity_key, device.signing_key, device.ts),
            )
            return _device(db, device.device) or device

        return await self._w.run(q)

    async def device(self, device_id: str) -> Device | None:
        return await self._r.run(lambda db: _device(db, device_id))

    async def devices_of(self, users: list[str]) -> list[Device]:
        marks = ",".join("?" * len(users))

        def q(db: sqlite3.Connection) -> list[Device]:
            rows = db.execute(
                "SELECT device, user, identity_key, signing_key, ts FROM devices "
                f"WHERE user IN ({marks}) ORDER BY user, device",
                users,
            ).fetchall()
            return [Device(*r) for r in rows]

        return await self._r.run(q) if users else []

    async def share(
        self, channel: str, key_id: str, sealed: dict[str, bytes], from_device: str | None, ts: int
    ) -> list[str]:
        def q(db: sqlite3.Connection) -> list[str]:
            def work() -> list[str]:
                conflicts = []
                for device, box in sealed.items():
                    cur = db.execute(
                        "INSERT OR IGNORE INTO channel_keys "
                        "(channel, device, key_id, sealed, from_device, ts) VALUES (?,?,?,?,?,?)",
                        (channel, device, key_id, box, from_device, ts),
                    )
                    if cur.rowcount == 0:
                        (held,) = db.execute(
                            "SELECT sealed FROM channel_keys "
                            "WHERE channel=? AND device=? AND key_id=?",
                            (channel, device, key_id),
                        ).fetchone()
                        if held != box:
                            conflicts.append(device)
                return conflicts

            return _transaction(db, work)

        return await self._w.run(q)

    async def fetch(
        self, channel: str, device: str, key_id: str | None
    ) -> tuple[str, bytes] | None:
        def q(db: sqlite3.Connection) -> tuple[str, bytes] | None:
            if key_id is None:
                row = db.execute(
                    "SELECT key_id, sealed FROM channel_keys WHERE channel=? AND device=? "
                    "ORDER BY ts DESC LIMIT 1",
                    (channel, device),
                ).fetchone()
            else:
                row = db.execute(
                    "SELECT key_id, sealed FROM channel_keys "
                    "WHERE channel=? AND device=? AND key_id=?",
                    (channel, device, key_id),
                ).fetchone()
            return (row[0], row[1]) if row else None

        return await self._r.run(q)


def _device(db: sqlite3.Connection, device_id: str) -> Device | None:
    row = db.execute(
        "SELECT device, user, identity_key, signing_key, ts FROM devices WHERE device=?",
        (device_id,),
    ).fetchone()
    return Device(*row) if row else None


_REPORT_COLUMNS = "id, channel, seq, reporter, sender, reason, ts, text, verified, state"


class SqliteReports:
    def __init__(self, writer: _Db, reader: _Db) -> None:
        self._w = writer
        self._r = reader

    async def add(self, report: Report) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT INTO reports ({_REPORT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
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
                f"SELECT {_REPORT_COLUMNS} FROM reports WHERE state=? ORDER BY ts LIMIT ?",
                (state, limit),
            ).fetchall()
            return [
                Report(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), r[9])
                for r in rows
            ]

        return await self._r.run(q)


class SqliteDocs:
    def __init__(self, writer: _Db, reader: _Db) -> None:
        self._w = writer
        self._r = reader

    async def insert(
        self, coll: str, key: str, doc: dict[str, Any], ix: Ix = None
    ) -> dict[str, Any] | None:
        blob = msgpack.packb(doc, use_bin_type=True)

        def q(db: sqlite3.Connection) -> dict[str, Any] | None:
            cur = db.execute(
                "INSERT OR IGNORE INTO docs (coll, key, ix, v, doc) VALUES (?,?,?,1,?)",
                (coll, key, ix, blob),
            )
            if cur.rowcount == 1:
                return None
            row = db.execute(
                "SELECT v, doc FROM docs WHERE coll=? AND key=?", (coll, key)
            ).fetchone()
            return _doc(row)

        return await self._w.run(q)

    async def get(self, coll: str, key: str) -> dict[str, Any] | None:
        def q(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute(
                "SELECT v, doc FROM docs WHERE coll=? AND key=?", (coll, key)
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
                    "INSERT INTO docs (coll, key, ix, v, doc) VALUES (?,?,?,1,?) "
                    "ON CONFLICT (coll, key) DO UPDATE SET ix=excluded.ix, v=v+1, "
                    "doc=excluded.doc",
                    (coll, key, ix, blob),
                )
                return True
            cur = db.execute(
                "UPDATE docs SET ix=?, v=v+1, doc=? WHERE coll=? AND key=? AND v=?",
                (ix, blob, coll, key, version),
            )
            return cur.rowcount == 1

        return await self._w.run(q)

    async def prefix(self, coll: str, key_prefix: str, limit: int) -> list[dict[str, Any]]:
        def q(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT v, doc FROM docs WHERE coll=? AND key>=? AND key<? ORDER BY key LIMIT ?",
                (coll, key_prefix, key_prefix + "\U0010ffff", limit),
            ).fetchall()
            return [_doc(r) for r in rows]

        return await self._r.run(q)

    async def below(self, coll: str, ix: int | str, limit: int) -> list[tuple[str, dict[str, Any]]]:
        def q(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
            rows = db.execute(
                "SELECT key, v, doc FROM docs WHERE coll=? AND ix<? ORDER BY ix LIMIT ?",
                (coll, ix, limit),
            ).fetchall()
            return [(r[0], _doc(r[1:])) for r in rows]

        return await self._r.run(q)

    async def find_ix(self, coll: str, ix: int | str) -> list[tuple[str, dict[str, Any]]]:
        def q(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
            rows = db.execute(
                "SELECT key, v, doc FROM docs WHERE coll=? AND ix=?", (coll, ix)
            ).fetchall()
            return [(r[0], _doc(r[1:])) for r in rows]

        return await self._r.run(q)

    async def delete(self, coll: str, key: str) -> bool:
        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute("DELETE FROM docs WHERE coll=? AND key=?", (coll, key))
            return cur.rowcount == 1

        return await self._w.run(q)

    async def delete_below(self, coll: str, ix: int | str) -> int:
        def q(db: sqlite3.Connection) -> int:
            return db.execute("DELETE FROM docs WHERE coll=? AND ix<?", (coll, ix)).rowcount

        return await self._w.run(q)


def _doc(row: tuple[Any, ...]) -> dict[str, Any]:
    version, blob = row
    doc: dict[str, Any] = msgpack.unpackb(blob, raw=False)
    doc["_v"] = version
    return doc


# Export/import: the plain documents of each kind, as columns -> values.
_DUMP = {
    "messages": (f"SELECT {_COLUMNS} FROM messages ORDER BY channel, seq", _COLUMNS),
    "memberships": ("SELECT channel, user, since FROM memberships", "channel, user, since"),
    "read_markers": ("SELECT channel, user, seq FROM read_markers", "channel, user, seq"),
    "channel_heads": ("SELECT channel, last_seq FROM channel_heads", "channel, last_seq"),
    "devices": (
        "SELECT device, user, identity_key, signing_key, ts FROM devices",
        "device, user, identity_key, signing_key, ts",
    ),
    "channel_keys": (
        "SELECT channel, device, key_id, sealed, from_device, ts FROM channel_keys",
        "channel, device, key_id, sealed, from_device, ts",
    ),
    "reports": (f"SELECT {_REPORT_COLUMNS} FROM reports", _REPORT_COLUMNS),
    "docs": ("SELECT coll, key, ix, v, doc FROM docs", "coll, key, ix, v, doc"),
}


class SqliteStore:
    """The embedded store (single-node topology)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "realtime.sqlite3"
        self._data_dir = data_dir
        self._writer = _Db(self.path, "writer")
        self._reader = _Db(self.path, "reader")
        self.messages = SqliteMessages(self._writer, self._reader)
        self.memberships = SqliteMemberships(self._writer, self._reader)
        self.read_markers = SqliteReadMarkers(self._writer, self._reader)
        self.keys = SqliteKeys(self._writer, self._reader)
        self.reports = SqliteReports(self._writer, self._reader)
        self.docs = SqliteDocs(self._writer, self._reader)

    async def open(self) -> None:
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create RT_DATA_DIR {self._data_dir}: {exc}") from exc

        def migrate(db: sqlite3.Connection) -> None:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"{self.path} has schema version {version}, newer than this server "
                    f"({SCHEMA_VERSION}): upgrade the server"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in filter(str.strip, MIGRATIONS[target - 1].split(";")):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version={target}")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")

        await self._writer.run(migrate)

    async def schema_version(self) -> int:
        return await self._reader.run(
            lambda db: int(db.execute("PRAGMA user_version").fetchone()[0])
        )

    async def ping(self) -> bool:
        try:
            await self._reader.run(lambda db: db.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    async def dump(self, kind: str) -> AsyncIterator[dict[str, Any]]:
        assert kind in RECORD_KINDS, kind
        query, columns = _DUMP[kind]
        names = [c.strip() for c in columns.split(",")]
        offset, page = 0, 1000
        while True:
            rows = await self._reader.run(
                lambda db, o=offset: db.execute(f"{query} LIMIT ? OFFSET ?", (page, o)).fetchall()  # type: ignore[misc]
            )
            for row in rows:
                record = dict(zip(names, row, strict=True))
                if kind in ("messages", "docs"):
                    field = "body" if kind == "messages" else "doc"
                    record[field] = msgpack.unpackb(record[field], raw=False)
                yield record
            if len(rows) < page:
                return
            offset += page

    async def load(self, kind: str, records: list[dict[str, Any]]) -> int:
        """Insert records, skipping any already present; returns how many were new."""
        assert kind in RECORD_KINDS, kind
        _, columns = _DUMP[kind]
        names = [c.strip() for c in columns.split(",")]
        rows = []
        for r in records:
            values = dict(r)
            if kind in ("messages", "docs"):
                field = "body" if kind == "messages" else "doc"
                values[field] = msgpack.packb(values[field], use_bin_type=True)
            rows.append(tuple(values.get(n) for n in names))
        table = kind
        placeholders = ",".join("?" * len(names))

        def q(db: sqlite3.Connection) -> int:
            def work() -> int:
                before = db.total_changes
                db.executemany(
                    f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({placeholders})", rows
                )
                return db.total_changes - before

            return _transaction(db, work)

        return await self._writer.run(q)

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()
