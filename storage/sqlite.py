"""The embedded store: SQLite files in WAL mode under RT_DATA_DIR.

`realtime.sqlite3` holds chat (messages, memberships, keys, reports); `alerts.sqlite3` holds
the documents (alerts, their delivery jobs and statuses, check-ins, bans), with writer and
reader threads of its own: an SOS never waits behind chat's group commits (issue 21).

All writes run on one dedicated thread with one connection and `synchronous=FULL`, so `seq`
assignment is serialised and nothing is acknowledged before it is on disk: a SIGKILL of the
process loses nothing acknowledged. Appends are group-committed: every append that arrives
while a commit is in progress joins the next transaction, so N concurrent publishers share one
fsync instead of paying N. Reads run on a second thread with its own connection (WAL lets them
proceed while a write commits).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack

from .base import RECORD_KINDS, StoreUnavailable
from .sqlite_db import Db, transaction
from .sqlite_messages import COLUMNS, SqliteMessages
from .sqlite_records import (
    REPORT_COLUMNS,
    SqliteDocs,
    SqliteKeys,
    SqliteMemberships,
    SqliteReadMarkers,
    SqliteReports,
)

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
    # v4: device ids are scoped per user (issue 23: a first-come global id could be
    # squatted). New tables keyed by (user, device), filled from the old ones, which stay
    # (unused) so that the step only adds.
    """
    CREATE TABLE IF NOT EXISTS user_devices (
        user TEXT NOT NULL, device TEXT NOT NULL, identity_key BLOB NOT NULL,
        signing_key BLOB NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY (user, device)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO user_devices (user, device, identity_key, signing_key, ts)
        SELECT user, device, identity_key, signing_key, ts FROM devices;
    CREATE TABLE IF NOT EXISTS user_channel_keys (
        channel TEXT NOT NULL, user TEXT NOT NULL, device TEXT NOT NULL, key_id TEXT NOT NULL,
        sealed BLOB NOT NULL, from_device TEXT, ts INTEGER NOT NULL,
        PRIMARY KEY (channel, user, device, key_id)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS user_channel_keys_newest
        ON user_channel_keys (channel, user, device, ts);
    INSERT OR IGNORE INTO user_channel_keys
        (channel, user, device, key_id, sealed, from_device, ts)
        SELECT k.channel, d.user, k.device, k.key_id, k.sealed, k.from_device, k.ts
        FROM channel_keys k JOIN devices d ON d.device = k.device;
    """,
    # v5: the documents live in alerts.sqlite3 (moved there by _open_alerts before this runs).
    """
    DROP TABLE IF EXISTS docs;
    """,
    # v6: chat's and end-to-end encryption's documents (the same shape as the alerts' docs).
    """
    CREATE TABLE IF NOT EXISTS records (
        coll TEXT NOT NULL, key TEXT NOT NULL, ix, v INTEGER NOT NULL, doc BLOB NOT NULL,
        PRIMARY KEY (coll, key)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS records_ix ON records (coll, ix);
    """,
    # v7: memberships by user (who shares a room with whom, for presence's visibility)
    """
    CREATE INDEX IF NOT EXISTS memberships_user ON memberships (user, channel);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
DOCS_MOVED = 5  # the version that dropped `docs` from realtime.sqlite3

# alerts.sqlite3: one schema version so far.
ALERTS_SCHEMA = """
    CREATE TABLE IF NOT EXISTS main.docs (
        coll TEXT NOT NULL, key TEXT NOT NULL, ix, v INTEGER NOT NULL, doc BLOB NOT NULL,
        PRIMARY KEY (coll, key)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS main.docs_ix ON docs (coll, ix);
"""
ALERTS_SCHEMA_VERSION = 1


# Export/import: the plain documents of each kind, as columns -> values.
_DUMP = {
    "messages": (f"SELECT {COLUMNS} FROM messages ORDER BY channel, seq", COLUMNS),
    "memberships": ("SELECT channel, user, since FROM memberships", "channel, user, since"),
    "read_markers": ("SELECT channel, user, seq FROM read_markers", "channel, user, seq"),
    "channel_heads": ("SELECT channel, last_seq FROM channel_heads", "channel, last_seq"),
    "devices": (
        "SELECT device, user, identity_key, signing_key, ts FROM user_devices",
        "device, user, identity_key, signing_key, ts",
    ),
    "channel_keys": (
        "SELECT channel, user, device, key_id, sealed, from_device, ts FROM user_channel_keys",
        "channel, user, device, key_id, sealed, from_device, ts",
    ),
    "reports": (f"SELECT {REPORT_COLUMNS} FROM reports", REPORT_COLUMNS),
    "docs": ("SELECT coll, key, ix, v, doc FROM docs", "coll, key, ix, v, doc"),
    "records": ("SELECT coll, key, ix, v, doc FROM records", "coll, key, ix, v, doc"),
}

_TABLES = {"devices": "user_devices", "channel_keys": "user_channel_keys"}  # kind -> table


def _with_users(db: sqlite3.Connection, rows: list[tuple[Any, ...]], names: list[str]) -> list[Any]:
    """Sealed keys exported before device ids were scoped per user carry no `user`: it is the
    one user with a device of that id (old ids were global); a key no device matches is left
    out."""
    at, dev = names.index("user"), names.index("device")
    out = []
    for row in rows:
        if row[at] is None:
            found = db.execute("SELECT user FROM user_devices WHERE device=?", (row[dev],))
            users = found.fetchall()
            if len(users) != 1:
                continue
            row = (*row[:at], users[0][0], *row[at + 1 :])
        out.append(row)
    return out


def create_private(data_dir: Path, db_path: Path) -> None:
    """The directory (0700, if we create it) and the database file (0600, if we create it)
    are the server account's alone: they hold phone numbers, locations and alert notes. SQLite
    gives its -wal and -shm files the database file's mode."""
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_dir.chmod(0o700)  # whatever the umask
    if not db_path.exists():
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600))


class SqliteStore:
    """The embedded store (single-node topology)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "realtime.sqlite3"
        self.alerts_path = data_dir / "alerts.sqlite3"
        self._data_dir = data_dir
        self._writer = Db(self.path, "writer")
        self._reader = Db(self.path, "reader")
        self._alerts_writer = Db(self.alerts_path, "alerts-writer")
        self._alerts_reader = Db(self.alerts_path, "alerts-reader")
        self.messages = SqliteMessages(self._writer, self._reader)
        self.memberships = SqliteMemberships(self._writer, self._reader)
        self.read_markers = SqliteReadMarkers(self._writer, self._reader)
        self.keys = SqliteKeys(self._writer, self._reader)
        self.reports = SqliteReports(self._writer, self._reader)
        self.docs = SqliteDocs(self._alerts_writer, self._alerts_reader)
        self.records = SqliteDocs(self._writer, self._reader, table="records")

    async def open(self) -> None:
        try:
            create_private(self._data_dir, self.path)
            create_private(self._data_dir, self.alerts_path)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create RT_DATA_DIR {self._data_dir}: {exc}") from exc
        path = self.path
        await self._writer.run(lambda db: _migrate(db, path, DOCS_MOVED - 1))
        await self._alerts_writer.run(lambda db: _open_alerts(db, self.alerts_path, path))
        await self._writer.run(lambda db: _migrate(db, path, SCHEMA_VERSION))

    async def schema_version(self) -> int:
        return await self._reader.run(
            lambda db: int(db.execute("PRAGMA user_version").fetchone()[0])
        )

    async def ping(self) -> bool:
        try:
            for db in (self._reader, self._alerts_reader):
                await db.run(lambda c: c.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    async def dump(self, kind: str) -> AsyncIterator[dict[str, Any]]:
        assert kind in RECORD_KINDS, kind
        query, columns = _DUMP[kind]
        names = [c.strip() for c in columns.split(",")]
        reader = self._dbs(kind)[1]
        offset, page = 0, 1000
        while True:
            rows = await reader.run(
                lambda db, o=offset: db.execute(f"{query} LIMIT ? OFFSET ?", (page, o)).fetchall()  # type: ignore[misc]
            )
            for row in rows:
                record = dict(zip(names, row, strict=True))
                if kind in ("messages", "docs", "records"):
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
            if kind in ("messages", "docs", "records"):
                field = "body" if kind == "messages" else "doc"
                values[field] = msgpack.packb(values[field], use_bin_type=True)
            rows.append(tuple(values.get(n) for n in names))
        table = _TABLES.get(kind, kind)
        placeholders = ",".join("?" * len(names))

        def q(db: sqlite3.Connection) -> int:
            def work() -> int:
                if kind == "channel_keys":
                    rows[:] = _with_users(db, rows, names)
                before = db.total_changes
                db.executemany(
                    f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({placeholders})", rows
                )
                return db.total_changes - before

            return transaction(db, work)

        return await self._dbs(kind)[0].run(q)

    async def close(self) -> None:
        for db in (self._writer, self._reader, self._alerts_writer, self._alerts_reader):
            await db.close()

    def _dbs(self, kind: str) -> tuple[Db, Db]:
        """The (writer, reader) holding records of `kind`."""
        if kind == "docs":
            return self._alerts_writer, self._alerts_reader
        return self._writer, self._reader


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _migrate(db: sqlite3.Connection, path: Path, upto: int) -> None:
    """Bring realtime.sqlite3 up to version `upto`, one transaction per step."""
    version = _version(db)
    if version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"{path} has schema version {version}, newer than this server "
            f"({SCHEMA_VERSION}): upgrade the server"
        )
    for target in range(version + 1, upto + 1):

        def step(target: int = target) -> None:
            for statement in filter(str.strip, MIGRATIONS[target - 1].split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={target}")

        transaction(db, step)


def _open_alerts(db: sqlite3.Connection, path: Path, chat_path: Path) -> None:
    """Create alerts.sqlite3's schema; a new one takes the documents an older server kept in
    realtime.sqlite3 (copied in the same transaction; the chat file drops them afterwards)."""
    version = _version(db)
    if version > ALERTS_SCHEMA_VERSION:
        raise StoreUnavailable(
            f"{path} has schema version {version}, newer than this server "
            f"({ALERTS_SCHEMA_VERSION}): upgrade the server"
        )
    if version == ALERTS_SCHEMA_VERSION:
        return
    db.execute("ATTACH DATABASE ? AS chat", (str(chat_path),))
    try:
        old = db.execute(
            "SELECT 1 FROM chat.sqlite_master WHERE type='table' AND name='docs'"
        ).fetchone()

        def create() -> None:
            for statement in filter(str.strip, ALERTS_SCHEMA.split(";")):
                db.execute(statement)
            if old:
                db.execute(
                    "INSERT OR IGNORE INTO main.docs (coll, key, ix, v, doc) "
                    "SELECT coll, key, ix, v, doc FROM chat.docs"
                )
            db.execute(f"PRAGMA user_version={ALERTS_SCHEMA_VERSION}")

        transaction(db, create)
    finally:
        db.execute("DETACH DATABASE chat")
