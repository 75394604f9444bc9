"""Gaps found by mutation testing (scripts/mutate storage): what the stores give back, the
indexes MongoDB is given, the embedded store's group commit when a commit fails and its files
after close, and the export format. Real SQLite files and a real MongoDB (or SecantusDB) through
pymongo."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import unique_db
from pymongo import MongoClient
from wire import until

from realtime_safety.storage import Report, Store, StoreUnavailable
from realtime_safety.storage.backup import ImportError_, export_store, import_store
from realtime_safety.storage.mongo import MongoStore
from realtime_safety.storage.sqlite import SqliteStore
from realtime_safety.storage.sqlite_db import Db


@pytest.fixture(params=["sqlite", "mongodb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(tmp_path)
    else:
        s = MongoStore(request.getfixturevalue("mongo_uri"), unique_db(), timeout_s=10)
    await s.open()
    yield s
    await s.close()


async def test_a_listed_report_has_every_field_it_was_added_with(store: Store) -> None:
    """`reports.list` returns each report exactly as added, field by field (mutant:
    storage/sqlite.py, `Report(r[0], r[1], r[2], …)` reading another column)."""
    added = [
        Report("r1", "room:a", 3, "bob", "alice", "abuse", 5, "bad words", True),
        Report("r2", "room:b", 40, "carol", "dave", "spam", 6, None, False),
    ]
    for r in added:
        await store.reports.add(r)
    assert await store.reports.list("open", 10) == added
    assert await store.reports.resolve("r1", "actioned")
    assert await store.reports.list("open", 10) == added[1:]
    resolved = await store.reports.list("actioned", 10)
    assert [(r.id, r.channel, r.seq, r.state) for r in resolved] == [
        ("r1", "room:a", 3, "actioned")
    ]


async def test_mongodb_gets_the_unique_indexes_its_records_rely_on(mongo_uri: str) -> None:
    """After `open` (the migrations), memberships and read markers are unique per (channel,
    user), and messages per (channel, seq) and per (channel, user, client_msg_id): the keys
    themselves, not only the index names (mutant: storage/mongo.py, an index on a misspelt
    field, which indexes every document as null)."""
    db_name = unique_db()
    store = MongoStore(mongo_uri, db_name, timeout_s=10)
    await store.open()
    await store.close()
    client: MongoClient[dict[str, object]] = MongoClient(mongo_uri)
    try:
        db = client[db_name]

        def unique_keys(collection: str) -> set[tuple[str, ...]]:
            return {
                tuple(ix["key"].keys()) for ix in db[collection].list_indexes() if ix.get("unique")
            }

        assert ("channel", "user") in unique_keys("memberships")
        assert ("channel", "user") in unique_keys("read_markers")
        assert ("channel", "seq") in unique_keys("messages")
        assert ("channel", "user", "client_msg_id") in unique_keys("messages")
    finally:
        client.close()


async def test_docs_survive_an_export_and_import_between_backends(
    store: Store, tmp_path: Path, mongo_uri: str
) -> None:
    """Documents (alerts, contacts, push tokens…) dumped from one backend and loaded into the
    other read back the same, by collection and key (mutant: storage/mongo.py, the dump's
    `coll` field misspelt, which loads every document into a nameless collection)."""
    await store.docs.insert("contacts", "ann", {"contacts": [{"tier": 1, "user": "bob"}]})
    await store.docs.put("alerts", "a1", {"state": "active"}, ix=1234)
    dumped = [r async for r in store.dump("docs")]
    other: Store
    if isinstance(store, SqliteStore):
        other = MongoStore(mongo_uri, unique_db(), timeout_s=10)
    else:
        other = SqliteStore(tmp_path / "other")
    await other.open()
    try:
        assert await other.load("docs", dumped) == 2
        contacts = await other.docs.get("contacts", "ann")
        assert contacts is not None and contacts["contacts"] == [{"tier": 1, "user": "bob"}]
        alert = await other.docs.get("alerts", "a1")
        assert alert is not None and alert["state"] == "active"
        assert [key for key, _ in await other.docs.find_ix("alerts", 1234)] == ["a1"]
    finally:
        await other.close()


async def test_a_put_without_a_version_always_writes_and_says_so(store: Store) -> None:
    """`DocStore.put` without `version` is an upsert that reports True, on a new key and on an
    existing one (mutant: storage/mongo_records.py, its `return True` → `return None`)."""
    assert await store.docs.put("contacts", "ann", {"contacts": []}) is True
    assert await store.docs.put("contacts", "ann", {"contacts": [{"user": "bob"}]}) is True
    assert await store.docs.get("contacts", "ann") == {"contacts": [{"user": "bob"}], "_v": 2}


async def test_appends_queued_behind_a_failed_group_commit_fail_too(tmp_path: Path) -> None:
    """When a group commit fails, every append waiting behind it gets the error as well, at
    once, however many groups they fill (mutant: storage/sqlite_messages.py, the failed batch's
    error re-raised instead of going on to the next batch, which leaves the later appends
    waiting forever). The commit fails here because the store was closed under them."""
    store = SqliteStore(tmp_path)
    await store.open()
    assert (await store.messages.append("room:a", "ann", None, "m0", {"t": 0}, 1)).message.seq == 1
    await store.close()
    appends = [
        store.messages.append("room:a", "ann", None, f"m{i}", {"t": i}, 1) for i in range(1, 301)
    ]  # more than one group (256)
    results = await asyncio.wait_for(asyncio.gather(*appends, return_exceptions=True), 10)
    assert all(isinstance(r, StoreUnavailable) for r in results), results[-1]


async def test_a_closed_embedded_store_leaves_one_checkpointed_file(tmp_path: Path) -> None:
    """Closing the embedded store closes its SQLite connections, so the write-ahead log is
    checkpointed into the database file and removed: what is left is one file that can be
    copied as a backup (mutant: storage/sqlite_db.py, `close` skipping the connection's close
    when its thread exists)."""
    store = SqliteStore(tmp_path)
    await store.open()
    await store.messages.append("room:a", "ann", None, "m1", {"t": "kept"}, 1)
    assert await store.messages.last_seq("room:a") == 1  # the reader's connection too
    wal = tmp_path / "realtime.sqlite3-wal"
    assert wal.exists()
    await store.close()
    assert not wal.exists() and not (tmp_path / "realtime.sqlite3-shm").exists()
    again = SqliteStore(tmp_path)
    await again.open()
    try:
        assert [m.body for m in await again.messages.after("room:a", 0, 10)] == [{"t": "kept"}]
    finally:
        await again.close()


def write_export(path: Path, meta: dict[str, object]) -> None:
    path.mkdir()
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "memberships.jsonl").write_text(
        '{"channel": "room:a", "user": "ann", "since": 1700000000000}\n\n'
    )


async def test_an_export_in_format_version_1_imports_and_other_formats_are_refused(
    store: Store, tmp_path: Path
) -> None:
    """An export as `realtime export` writes it (meta.json `{"format": "realtime-export",
    "version": 1}`, one JSON document per line, blank lines ignored) imports into either store;
    another format name or another version is refused before anything is read (mutants:
    storage/backup.py, FORMAT_VERSION changed, and the check's `or` → `and`)."""
    good = tmp_path / "good"
    write_export(good, {"format": "realtime-export", "version": 1, "store": "sqlite"})
    added = await import_store(store, good)
    assert added["memberships"] == 1 and added["messages"] == 0
    assert await store.memberships.is_member("room:a", "ann")
    for name, meta in [
        ("format", {"format": "other-export", "version": 1}),
        ("version", {"format": "realtime-export", "version": 2}),
    ]:
        write_export(tmp_path / name, meta)
        with pytest.raises(ImportError_, match="unsupported export format"):
            await import_store(store, tmp_path / name)


async def test_an_export_creates_its_directory_and_can_be_written_again(tmp_path: Path) -> None:
    """`realtime export --out DIR` creates DIR with any missing parents, and exporting into
    the same DIR again replaces the export (mutants: storage/backup.py, the directory's
    `mkdir(parents=True, exist_ok=True)` with either flag False, or removed)."""
    store = SqliteStore(tmp_path / "data")
    await store.open()
    try:
        await store.memberships.add("room:a", "ann", 1)
        out = tmp_path / "backups" / "nightly" / "latest"
        assert (await export_store(store, out, store_kind="sqlite"))["memberships"] == 1
        await store.memberships.add("room:a", "bob", 2)
        assert (await export_store(store, out, store_kind="sqlite"))["memberships"] == 2
    finally:
        await store.close()
    assert json.loads((out / "meta.json").read_text())["counts"]["memberships"] == 2
    assert len((out / "memberships.jsonl").read_text().splitlines()) == 2


async def occupied(db: Db) -> tuple[threading.Event, asyncio.Future[Any]]:
    """Hold `db`'s thread busy with one call (as a long chat read or write would) until the
    returned event is set; returns once the call is running."""
    running, release = threading.Event(), threading.Event()

    def hold(_: sqlite3.Connection) -> None:
        running.set()
        release.wait(10)

    held = asyncio.ensure_future(db.run(hold))
    await until(running.is_set, what="the held call to run")
    return release, held


async def test_document_calls_never_wait_for_the_chat_threads(tmp_path: Path) -> None:
    """Overload control (issue 21): the documents (alerts, their jobs, bans) have their own
    file and threads, so with both chat threads held busy (a long group commit, a long read)
    every document call still completes (mutants: storage/sqlite.py, `docs` on the chat
    threads)."""
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        held = [await occupied(store._writer), await occupied(store._reader)]
        await store.docs.put("alerts", "a0", {"state": "active"}, ix=5)
        assert await store.docs.insert("alerts", "a1", {"state": "active"}, ix=7) is None
        assert (await store.docs.get("alerts", "a0") or {}).get("state") == "active"
        assert [k for k, _ in await store.docs.below("alerts", 10, 10)] == ["a0", "a1"]
        assert len(await store.docs.prefix("alerts", "a", 10)) == 2
        assert [k for k, _ in await store.docs.find_ix("alerts", 5)] == ["a0"]
        assert await store.docs.delete("alerts", "a1")
        assert await store.docs.delete_below("alerts", 6) == 1
        for release, call in held:
            assert not call.done()  # the chat threads were busy all along
            release.set()
            await call
    finally:
        await store.close()
