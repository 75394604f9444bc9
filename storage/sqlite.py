"""The embedded store: one SQLite file in WAL mode under RT_DATA_DIR.

All writes run on one dedicated thread (one connection, `synchronous=FULL`, each append its own
transaction), so `seq` assignment is serialised and an acknowledged message has been fsynced
before the reply: a SIGKILL of the process loses nothing acknowledged. Reads run on a second
thread with its own connection (WAL lets them proceed while a write commits).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from .base import SCHEMA_VERSION, Appended, Message, StoreUnavailable

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    channel TEXT NOT NULL, seq INTEGER NOT NULL, ts INTEGER NOT NULL,
    user TEXT NOT NULL, device TEXT, client_msg_id TEXT NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency
    ON messages (channel, user, client_msg_id);
CREATE TABLE IF NOT EXISTS memberships (
    channel TEXT NOT NULL, user TEXT NOT NULL, since INTEGER NOT NULL,
    PRIMARY KEY (channel, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS read_markers (
    channel TEXT NOT NULL, user TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (channel, user)
) WITHOUT ROWID;
"""

_COLUMNS = "channel, seq, ts, user, device, client_msg_id, body"


def _row(row: tuple[Any, ...]) -> Message:
    channel, seq, ts, user, device, cmid, body = row
    return Message(channel, seq, ts, user, device, cmid, msgpack.unpackb(body, raw=False))


class _Db:
    """A connection owned by one thread; every call runs there."""

    def __init__(self, path: Path, name: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{name}")
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
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
            return await loop.run_in_executor(self._executor, lambda: fn(self._connect()))
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def close(self) -> None:
        def _close(_: sqlite3.Connection) -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._conn is not None:
            await self.run(_close)
        self._executor.shutdown(wait=True)


class SqliteMessages:
    def __init__(self, writer: _Db, reader: _Db) -> None:
        self._w = writer
        self._r = reader

    async def append(
        self,
        channel: str,
        user: str,
        device: str | None,
        client_msg_id: str,
        body: dict[str, Any],
        ts: int,
    ) -> Appended:
        blob = msgpack.packb(body, use_bin_type=True)

        def txn(db: sqlite3.Connection) -> Appended:
            db.execute("BEGIN IMMEDIATE")
            try:
                found = db.execute(
                    f"SELECT {_COLUMNS} FROM messages "
                    "WHERE channel=? AND user=? AND client_msg_id=?",
                    (channel, user, client_msg_id),
                ).fetchone()
                if found:
                    db.execute("ROLLBACK")
                    return Appended(_row(found), duplicate=True)
                (last,) = db.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE channel=?", (channel,)
                ).fetchone()
                seq = last + 1
                db.execute(
                    f"INSERT INTO messages ({_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                    (channel, seq, ts, user, device, client_msg_id, blob),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return Appended(Message(channel, seq, ts, user, device, client_msg_id, body), False)

        return await self._w.run(txn)

    async def last_seq(self, channel: str) -> int:
        def q(db: sqlite3.Connection) -> int:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE channel=?", (channel,)
            ).fetchone()
            return int(last)

        return await self._r.run(q)

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

    async def open(self) -> None:
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create RT_DATA_DIR {self._data_dir}: {exc}") from exc

        def migrate(db: sqlite3.Connection) -> None:
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row and int(row[0]) > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"{self.path} has schema version {row[0]}, newer than this server "
                    f"({SCHEMA_VERSION}): upgrade the server"
                )
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

        await self._writer.run(migrate)

    async def ping(self) -> bool:
        try:
            await self._reader.run(lambda db: db.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._writer.close()
        await self._reader.close()
