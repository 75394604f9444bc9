"""One contract suite per storage interface, run against both implementations."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import unique_db

from storage import Store
from storage.mongo import MongoStore
from storage.sqlite import SqliteStore

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

    from storage import StoreUnavailable

    store = MongoStore(
        f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", "x", timeout_s=0.5
    )
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.open(), 5)
    assert await store.ping() is False
    await store.close()
