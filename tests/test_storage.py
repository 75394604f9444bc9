"""One contract suite per storage interface, run against both implementations."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import unique_db

from realtime_safety.storage import Store
from realtime_safety.storage.mongo import MongoStore
from realtime_safety.storage.sqlite import SqliteStore
from realtime_safety.storage.sqlite_db import Db

ENVELOPE = {
    "v": 1,
    "alg": "xchacha20poly1305",
    "device": "d1",
    "key_id": "k1",
    "nonce": os.urandom(24),
    "ct": os.urandom(40),
    "sig": os.urandom(64),
}

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "mongodb"])
async def factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Makes stores over one shared backend (two MongoStores = two nodes on one database)."""
    opened: list[Store] = []
    if request.param == "sqlite":

        def make() -> Store:
            return SqliteStore(tmp_path)
    else:
        uri = request.getfixturevalue("mongo_uri")
        db = unique_db()

        def make() -> Store:
            return MongoStore(uri, db, timeout_s=10)

    async def opened_store() -> Store:
        store = make()
        await store.open()
        opened.append(store)
        return store

    yield opened_store  # type: ignore[misc]
    for store in opened:
        await store.close()


async def test_append_assigns_gap_free_seqs_and_reads_back(factory: Any) -> None:
    store = await factory()
    m = store.messages
    assert await m.last_seq("room:a") == 0
    for i in range(5):
        appended = await m.append("room:a", "alice", "d1", f"c{i}", ENVELOPE, 1000 + i)
        assert (appended.message.seq, appended.duplicate) == (i + 1, False)
    await m.append("room:b", "alice", None, "c0", {"v": 1, "alg": "none", "text": "x"}, 5)
    assert await m.last_seq("room:a") == 5
    assert await m.last_seq("room:b") == 1
    after = await m.after("room:a", 2, 10)
    assert [x.seq for x in after] == [3, 4, 5]
    assert after[0].body == ENVELOPE  # bytes come back as bytes
    assert (after[0].user, after[0].device, after[0].client_msg_id, after[0].ts) == (
        "alice",
        "d1",
        "c2",
        1002,
    )
    assert [x.seq for x in await m.after("room:a", 0, 2)] == [1, 2]
    assert [x.seq for x in await m.before("room:a", None, 2)] == [4, 5]
    assert [x.seq for x in await m.before("room:a", 4, 10)] == [1, 2, 3]
    assert await m.before("room:zzz", None, 10) == []


async def test_append_is_idempotent_per_sender_and_client_msg_id(factory: Any) -> None:
    m = (await factory()).messages
    first = await m.append("room:a", "alice", "d1", "same", ENVELOPE, 1)
    again = await m.append("room:a", "alice", "d1", "same", {"other": True}, 2)
    assert again.duplicate and again.message == first.message
    bob = await m.append("room:a", "bob", None, "same", ENVELOPE, 3)
    assert (bob.message.seq, bob.duplicate) == (2, False)
    elsewhere = await m.append("room:b", "alice", "d1", "same", ENVELOPE, 4)
    assert (elsewhere.message.seq, elsewhere.duplicate) == (1, False)


async def test_concurrent_appends_from_two_nodes_form_one_total_order(factory: Any) -> None:
    nodes = [await factory(), await factory()]

    async def publisher(n: int) -> list[int]:
        store = nodes[n % 2]
        seqs = []
        for i in range(6):
            appended = await store.messages.append("room:busy", f"u{n}", None, f"m{i}", ENVELOPE, i)
            seqs.append(appended.message.seq)
        return seqs

    results = await asyncio.gather(*(publisher(n) for n in range(4)))
    every = sorted(s for r in results for s in r)
    assert every == list(range(1, 25))  # no gap, no reuse
    for r in results:
        assert r == sorted(r)  # each publisher's own order is kept
    stored = await nodes[0].messages.after("room:busy", 0, 100)
    assert [m.seq for m in stored] == list(range(1, 25))


async def test_concurrent_retries_of_one_message_store_it_once(factory: Any) -> None:
    nodes = [await factory(), await factory()]
    results = await asyncio.gather(
        *(
            nodes[i % 2].messages.append("room:r", "alice", None, "once", ENVELOPE, i)
            for i in range(6)
        )
    )
    assert {r.message.seq for r in results} == {1}
    assert sum(not r.duplicate for r in results) == 1
    assert await nodes[0].messages.last_seq("room:r") == 1


async def test_memberships(factory: Any) -> None:
    ms = (await factory()).memberships
    assert await ms.add("room:a", "bob", 1) is True
    assert await ms.add("room:a", "bob", 2) is False
    for user in ("carol", "alice", "dave"):
        await ms.add("room:a", user, 3)
    await ms.add("room:b", "erin", 3)
    assert await ms.is_member("room:a", "bob")
    assert not await ms.is_member("room:b", "bob")
    assert await ms.members("room:a", 2, None) == ["alice", "bob"]
    assert await ms.members("room:a", 10, "bob") == ["carol", "dave"]
    assert await ms.remove("room:a", "bob") is True
    assert await ms.remove("room:a", "bob") is False
    assert not await ms.is_member("room:a", "bob")


async def test_who_shares_a_room_with_whom(factory: Any) -> None:
    """For presence's visibility: one channel of the prefix with both users in it."""
    m = (await factory()).memberships
    for channel, user in (
        ("room:a", "ann"), ("room:a", "bob"), ("room:b", "cid"), ("public:x", "ann"),
        ("public:x", "cid"), ("rooms:z", "ann"), ("rooms:z", "dee"),
    ):  # fmt: skip
        await m.add(channel, user, 1)
    assert await m.shared("ann", "bob", "room:") and await m.shared("bob", "ann", "room:")
    assert not await m.shared("ann", "cid", "room:")  # only a public channel in common
    assert await m.shared("ann", "cid", "public:")
    assert not await m.shared("ann", "dee", "room:")  # "rooms:" is another namespace
    assert not await m.shared("ann", "eve", "room:")
    await m.remove("room:a", "bob")
    assert not await m.shared("ann", "bob", "room:")


async def test_read_markers_only_move_forward(factory: Any) -> None:
    rm = (await factory()).read_markers
    assert await rm.get("room:a", "bob") == 0
    assert await rm.set("room:a", "bob", 5) == 5
    assert await rm.set("room:a", "bob", 3) == 5
    assert await rm.set("room:a", "bob", 9) == 9
    assert await rm.get("room:a", "bob") == 9
    assert await rm.get("room:a", "alice") == 0


async def test_open_is_idempotent_and_data_survives_reopen(factory: Any) -> None:
    store = await factory()
    await store.messages.append("room:a", "alice", None, "keep", ENVELOPE, 1)
    await store.open()  # again: indexes and tables already there
    again = await factory()
    assert await again.messages.last_seq("room:a") == 1
    assert await again.ping()


async def test_mongodb_documents_hold_ciphertext_as_sent(mongo_uri: str) -> None:
    from pymongo import AsyncMongoClient

    db = unique_db()
    store = MongoStore(mongo_uri, db)
    await store.open()
    await store.messages.append("room:a", "alice", "d1", "c1", ENVELOPE, 1)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    doc = await client[db]["messages"].find_one({"channel": "room:a"})
    assert doc is not None
    assert doc["body"]["ct"] == ENVELOPE["ct"] and doc["body"]["alg"] == "xchacha20poly1305"
    assert "text" not in doc["body"]
    indexes = await client[db]["messages"].index_information()
    assert any(
        ix.get("unique") and [k for k, _ in ix["key"]] == ["channel", "seq"]
        for ix in indexes.values()
    )
    await client.close()
    await store.close()


async def test_unreachable_mongodb_is_unavailable_not_a_hang() -> None:
    from conftest import free_port

    from realtime_safety.storage import StoreUnavailable

    store = MongoStore(
        f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", "x", timeout_s=0.5
    )
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.open(), 5)
    assert await store.ping() is False
    await store.close()


async def test_retention_purge_never_lets_a_seq_be_reused(factory: Any) -> None:
    store = await factory()
    m = store.messages
    for i in range(3):
        await m.append("public:old", "alice", None, f"o{i}", ENVELOPE, 1000 + i)
    await m.append("public:mixed", "alice", None, "old", ENVELOPE, 1000)
    await m.append("public:mixed", "alice", None, "new", ENVELOPE, 5000)
    await m.append("room:kept", "alice", None, "r", ENVELOPE, 1000)
    assert await m.purge("public", before_ts=2000) == 4
    assert await m.after("public:old", 0, 10) == []
    assert [x.client_msg_id for x in await m.after("public:mixed", 0, 10)] == ["new"]
    assert len(await m.after("room:kept", 0, 10)) == 1  # other namespaces untouched
    assert await m.last_seq("public:old") == 3  # remembered although every message went
    fresh = await factory()  # a node with no cached seqs
    appended = await fresh.messages.append("public:old", "bob", None, "b", ENVELOPE, 9000)
    assert appended.message.seq == 4
    assert await m.purge("public", before_ts=2000) == 0


async def test_schema_version_is_recorded_and_newer_databases_are_refused(
    factory: Any, tmp_path: Path
) -> None:
    store = await factory()
    version = await store.schema_version()
    assert version >= 1
    if isinstance(store, SqliteStore):
        await store._writer.run(lambda db: db.execute(f"PRAGMA user_version={version + 1}"))
    else:
        await store._db["meta"].update_one({"_id": "schema"}, {"$set": {"version": version + 1}})
    from realtime_safety.storage import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="newer than this server"):
        await factory()


async def test_dump_and_load_round_trip_between_backends(
    factory: Any, tmp_path: Path, mongo_uri: str
) -> None:
    source = await factory()
    for i in range(3):
        await source.messages.append("room:a", "alice", "d1", f"c{i}", ENVELOPE, i)
    await source.messages.append(
        "public:x", "bob", None, "p", {"v": 1, "alg": "none", "text": "hi"}, 1
    )
    await source.messages.purge("public", before_ts=10)
    await source.memberships.add("room:a", "alice", 7)
    await source.read_markers.set("room:a", "alice", 2)
    await source.docs.put("alerts", "a1", {"loc": b"\x01"}, ix=3)
    await source.records.put("kt", "0000000001", {"entry": b"\x02"}, ix=1)
    from realtime_safety.storage import RECORD_KINDS

    dumped = {kind: [r async for r in source.dump(kind)] for kind in RECORD_KINDS}
    assert len(dumped["messages"]) == 3 and dumped["messages"][0]["body"] == ENVELOPE
    assert dumped["channel_heads"] == [{"channel": "public:x", "last_seq": 1}]
    # into the other backend, twice (import is idempotent)
    other: Store = (
        MongoStore(mongo_uri, unique_db())
        if isinstance(source, SqliteStore)
        else SqliteStore(tmp_path / "other")
    )
    await other.open()
    try:
        for kind in RECORD_KINDS:
            assert await other.load(kind, dumped[kind]) == len(dumped[kind])
            assert await other.load(kind, dumped[kind]) == 0
        assert [r async for r in other.dump("messages")] == dumped["messages"]
        assert (await other.docs.get("alerts", "a1") or {}).get("loc") == b"\x01"
        assert (await other.records.get("kt", "0000000001") or {}).get("entry") == b"\x02"
        assert await other.messages.last_seq("public:x") == 1
        assert await other.memberships.is_member("room:a", "alice")
        assert await other.read_markers.get("room:a", "alice") == 2
        nxt = await other.messages.append("room:a", "carol", None, "n", ENVELOPE, 9)
        assert nxt.message.seq == 4
    finally:
        await other.close()


async def test_a_big_group_commit_lets_its_callers_go_on_a_few_per_turn(tmp_path: Path) -> None:
    """256 appends committed together resume 32 per turn of the event loop, so the sockets'
    reads (an SOS among them) wait for 32 fan-outs at most, not 256 (issue 21)."""
    store = SqliteStore(tmp_path)
    await store.open()
    turn = 0
    ticking = True

    def tick() -> None:  # counts turns of the loop: one call_soon chain, a step per turn
        nonlocal turn
        turn += 1
        if ticking:
            asyncio.get_running_loop().call_soon(tick)

    async def append(i: int) -> int:
        await store.messages.append(f"room:r{i}", "alice", None, f"m{i}", ENVELOPE, i)
        return turn

    try:
        asyncio.get_running_loop().call_soon(tick)
        turns = await asyncio.gather(*(append(i) for i in range(256)))
    finally:
        ticking = False
        await store.close()
    assert store.messages.batches == 1
    per_turn = Counter(turns)
    assert len(per_turn) >= 8 and max(per_turn.values()) <= 32


async def test_concurrent_appends_are_grouped_and_stay_exact(factory: Any) -> None:
    store = await factory()
    # 40 publishes to one channel at once, 10 of them retries of earlier client_msg_ids
    results = await asyncio.gather(
        *(
            store.messages.append("room:hot", "alice", None, f"g{i % 30}", ENVELOPE, i)
            for i in range(40)
        )
    )
    fresh = [r for r in results if not r.duplicate]
    assert sorted(r.message.seq for r in fresh) == list(range(1, 31))
    by_id = {r.message.client_msg_id: r.message.seq for r in fresh}
    assert all(by_id[r.message.client_msg_id] == r.message.seq for r in results)
    assert store.messages.batches < 30  # grouped, not one round trip each
    assert [m.seq for m in await store.messages.after("room:hot", 0, 100)] == list(range(1, 31))


async def test_key_directory(factory: Any) -> None:
    from realtime_safety.storage import Device

    keys = (await factory()).keys
    phone = Device("phone-1", "alice", b"i" * 32, b"s" * 32, 1)
    assert await keys.register(phone) == phone
    assert await keys.register(Device("phone-1", "alice", b"x" * 32, b"y" * 32, 2)) == phone
    # device ids are scoped per user: mallory's phone-1 is another device, alice's is kept
    mallory = Device("phone-1", "mallory", b"x" * 32, b"y" * 32, 2)
    assert await keys.register(mallory) == mallory
    assert await keys.device("alice", "phone-1") == phone
    assert await keys.device("mallory", "phone-1") == mallory
    await keys.register(Device("laptop-1", "alice", b"j" * 32, b"t" * 32, 3))
    await keys.register(Device("bob-1", "bob", b"k" * 32, b"u" * 32, 4))
    assert [d.device for d in await keys.devices_of(["alice"])] == ["laptop-1", "phone-1"]
    assert await keys.device("alice", "nope") is None
    assert await keys.device("bob", "phone-1") is None
    a, b, m = ("alice", "phone-1"), ("bob", "bob-1"), ("mallory", "phone-1")
    assert await keys.share("room:a", "k1", {a: b"A", b: b"B"}, "phone-1", 10) == []
    assert await keys.share("room:a", "k1", {a: b"A"}, "phone-1", 11) == []  # same: fine
    assert await keys.share("room:a", "k1", {a: b"Z", m: b"M"}, "bob-1", 12) == [a]
    await keys.share("room:a", "k2", {a: b"A2"}, "phone-1", 20)
    assert await keys.fetch("room:a", "alice", "phone-1", None) == ("k2", b"A2")  # the newest
    assert await keys.fetch("room:a", "alice", "phone-1", "k1") == ("k1", b"A")
    assert await keys.fetch("room:a", "mallory", "phone-1", None) == ("k1", b"M")
    assert await keys.fetch("room:a", "bob", "bob-1", "k2") is None


async def test_reports(factory: Any) -> None:
    from realtime_safety.storage import Report

    reports = (await factory()).reports
    await reports.add(Report("r1", "room:a", 3, "bob", "alice", "abuse", 5, "bad words", True))
    await reports.add(Report("r2", "room:a", 4, "bob", "alice", "spam", 6, None, False))
    listed = await reports.list("open", 10)
    assert [r.id for r in listed] == ["r1", "r2"]
    assert listed[0].verified is True and listed[0].text == "bad words"
    assert listed[1].text is None and listed[1].verified is False


@pytest.mark.parametrize("which", ["docs", "records"])
async def test_docs(factory: Any, which: str) -> None:
    store = await factory()
    docs = getattr(store, which)
    other = store.records if which == "docs" else store.docs
    await other.put("alerts", "a1", {"state": "elsewhere"})  # the two never mix
    assert await docs.insert("alerts", "a1", {"state": "active", "loc": b"\x01"}, ix=100) is None
    existing = await docs.insert("alerts", "a1", {"state": "other"}, ix=5)
    assert existing is not None and existing["state"] == "active" and existing["_v"] == 1
    got = await docs.get("alerts", "a1")
    assert got == {"state": "active", "loc": b"\x01", "_v": 1}
    assert await docs.put("alerts", "a1", {**got, "state": "acked"}, ix=50, version=1)
    assert not await docs.put("alerts", "a1", {**got, "state": "lost"}, ix=50, version=1)
    assert (await docs.get("alerts", "a1"))["state"] == "acked"
    for i in range(3):
        await docs.put("trail", f"a1|{i:04d}", {"i": i}, ix=i)
    await docs.put("trail", "a2|0000", {"i": 9}, ix=9)
    assert [d["i"] for d in await docs.prefix("trail", "a1|", 10)] == [0, 1, 2]
    assert await docs.count("trail", "a1|", 10) == 3
    assert await docs.count("trail", "a1|", 2) == 2  # counts no further than asked
    assert await docs.count("trail", "a", 10) == 4 and await docs.count("trail", "a3", 10) == 0
    assert [k for k, _ in await docs.below("trail", 2, 10)] == ["a1|0000", "a1|0001"]
    assert [k for k, _ in await docs.find_ix("alerts", 50)] == ["a1"]
    assert await docs.delete_below("trail", 2) == 2
    assert await docs.delete("trail", "a2|0000") is True
    assert [d["i"] for d in await docs.prefix("trail", "", 10)] == [2]
    assert (await other.get("alerts", "a1") or {})["state"] == "elsewhere"


async def test_redact_and_resolve(factory: Any) -> None:
    from realtime_safety.storage import Report

    store = await factory()
    await store.messages.append("room:m", "alice", None, "c1", ENVELOPE, 1)
    tomb = {"v": 1, "alg": "deleted", "reason": "abuse"}
    assert await store.messages.redact("room:m", 1, tomb) is True
    assert await store.messages.redact("room:m", 9, tomb) is False
    assert (await store.messages.after("room:m", 0, 5))[0].body == tomb
    await store.reports.add(Report("r9", "room:m", 1, "bob", "alice", "x", 1, None, False))
    assert await store.reports.resolve("r9", "actioned") is True
    assert await store.reports.resolve("r9", "dismissed") is False  # no longer open
    assert [r.id for r in await store.reports.list("actioned", 5)] == ["r9"]


async def test_sqlite_documents_move_to_their_own_file_and_chat_keeps_none(
    tmp_path: Path,
) -> None:
    """Alerts are documents in alerts.sqlite3, with their own writer (an SOS never waits
    behind chat's group commits); a database from before keeps its documents, moved."""
    import sqlite3

    from realtime_safety.storage.sqlite import DOCS_MOVED, MIGRATIONS

    chat = sqlite3.connect(tmp_path / "realtime.sqlite3", isolation_level=None)
    for version, script in enumerate(MIGRATIONS[: DOCS_MOVED - 1], start=1):
        for statement in filter(str.strip, script.split(";")):
            chat.execute(statement)
        chat.execute(f"PRAGMA user_version={version}")
    chat.execute("INSERT INTO docs VALUES ('alerts', 'a1', 5, 3, ?)", (b"\x81\xa1k\xa1v",))
    chat.close()
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        assert await store.docs.get("alerts", "a1") == {"k": "v", "_v": 3}
        assert await store.docs.below("alerts", 6, 10) == [("a1", {"k": "v", "_v": 3})]
        await store.docs.insert("alerts", "a2", {"n": 1})
    finally:
        await store.close()
    chat = sqlite3.connect(tmp_path / "realtime.sqlite3")
    tables = {r[0] for r in chat.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    chat.close()
    assert "docs" not in tables and "messages" in tables  # no phone number left behind
    alerts = sqlite3.connect(tmp_path / "alerts.sqlite3")
    assert alerts.execute("SELECT key FROM docs ORDER BY key").fetchall() == [("a1",), ("a2",)]
    alerts.close()
    assert oct((tmp_path / "alerts.sqlite3").stat().st_mode & 0o777) == "0o600"
    again = SqliteStore(tmp_path)  # opening again moves nothing twice
    await again.open()
    try:
        assert [k for k, _ in await again.docs.below("alerts", 6, 10)] == ["a1"]
        assert [r["key"] async for r in again.dump("docs")] == ["a1", "a2"]
    finally:
        await again.close()


async def test_a_call_whose_loop_closed_meanwhile_leaves_the_thread_serving(
    tmp_path: Path,
) -> None:
    """A call made from a loop that is closed before its answer (the alert lane stopping with a
    call in flight) is dropped; the connection's thread goes on with the calls after it (it
    died, and every later call, the store's close among them, waited forever)."""
    db = Db(tmp_path / "x.sqlite3", "t")
    running, release = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> int:
        running.set()
        release.wait(10)
        return 1

    def another_loop() -> None:  # makes the call, gives up on it, and closes
        loop = asyncio.new_event_loop()

        async def call() -> None:
            task = asyncio.ensure_future(db.run(slow))
            await asyncio.to_thread(running.wait, 10)
            task.cancel()

        loop.run_until_complete(call())
        loop.close()  # its call is still running on the thread

    await asyncio.to_thread(another_loop)
    release.set()
    async with asyncio.timeout(10):
        assert await db.run(lambda conn: conn.execute("SELECT 7").fetchone()[0]) == 7
        await db.close()
