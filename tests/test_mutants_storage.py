"""Gaps found by mutation testing (scripts/mutate storage): what the stores give back and the
indexes MongoDB is given. Real SQLite files and a real MongoDB (or SecantusDB) through pymongo."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import unique_db
from pymongo import MongoClient

from realtime_safety.storage import Report, Store
from realtime_safety.storage.mongo import MongoStore
from realtime_safety.storage.sqlite import SqliteStore


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
