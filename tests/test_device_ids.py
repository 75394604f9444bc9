"""Device ids cannot be squatted (issue 23, hole 3): the key directory keys devices by (user,
device), so the same device name under two users never collides; databases of the earlier
schema (global device ids) are migrated and keep working; the client library picks random
device ids. Real server processes, real clients, real SQLite and MongoDB."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Node, running_node, token, unique_db
from pymongo import AsyncMongoClient
from wire import Raw, b64

from realtime_safety.crypto.client import Decrypted, SecureClient
from realtime_safety.crypto.e2ee import DeviceKeys
from realtime_safety.storage.mongo import MIGRATIONS as MONGO_MIGRATIONS
from realtime_safety.storage.mongo import MongoStore
from realtime_safety.storage.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from realtime_safety.storage.sqlite import SqliteStore


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from running_node(tmp_path_factory.mktemp("devices"), "devices")


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def test_a_device_id_taken_by_another_user_is_still_yours_to_use(node: Node) -> None:
    ivy, eve, bob = uid("ivy"), uid("eve"), uid("bob")
    room = f"room:{uid('r')}"
    for u in (ivy, eve, bob):
        node.add_member(room, u)
    name = f"{ivy}-phone"
    eve_keys, ivy_keys = DeviceKeys.generate(name), DeviceKeys.generate(name)
    eve_ws = await Raw.open(node.url, token(eve, device=name))
    ivy_ws = await Raw.open(node.url, token(ivy, device=name))
    bob_ws = await Raw.open(node.url, token(bob))
    # eve squats the name first; ivy's own registration is hers all the same
    await eve_ws.ok("keys.register", **b64(eve_keys.registration(eve)))
    await ivy_ws.ok("keys.register", **b64(ivy_keys.registration(ivy)))
    # the control: one user's device id still names one set of keys
    other = DeviceKeys.generate(name)
    assert (await ivy_ws.cmd("keys.register", **b64(other.registration(ivy))))["error"][
        "code"
    ] == "conflict"
    found = (await bob_ws.ok("keys.lookup", users=[ivy, eve]))["devices"]
    assert [(d["user"], d["device"]) for d in found] == sorted([(ivy, name), (eve, name)])
    assert {d["user"]: d["signing_key"] for d in found} == b64(
        {ivy: ivy_keys.signing_public, eve: eve_keys.signing_public}
    )

    # keys sealed to each user's device of that name stay apart
    boxes = {ivy: os.urandom(80), eve: os.urandom(80)}
    sealed = {u: {name: box} for u, box in boxes.items()}
    shared = await bob_ws.ok("keys.share", channel=room, key_id="k1", sealed=b64(sealed))
    assert shared["conflicts"] == []
    for user, raw in ((ivy, ivy_ws), (eve, eve_ws)):
        fetched = await raw.ok("keys.fetch", channel=room)  # the token's device claim
        assert fetched["sealed"] == b64(boxes[user]), user

    # each signs as her own device: ivy's envelope verifies, eve cannot pass hers off as ivy's
    from realtime_safety.crypto.e2ee import encrypt, new_channel_key

    key = new_channel_key()
    body = encrypt(ivy_keys, room, "m1", "k1", key, "from ivy")
    await ivy_ws.ok("publish", channel=room, client_msg_id="m1", body=b64(body))
    forged = encrypt(eve_keys, room, "m2", "k1", key, "not from ivy")
    reply = await ivy_ws.cmd("publish", channel=room, client_msg_id="m2", body=b64(forged))
    assert reply["error"]["code"] == "forbidden", reply  # ivy's device, eve's signature
    await eve_ws.ok("publish", channel=room, client_msg_id="m2", body=b64(forged))
    history = (await bob_ws.ok("history", channel=room))["messages"]
    assert [(m["from"]["user"], m["from"]["device"]) for m in history] == [
        (ivy, name),
        (eve, name),
    ]
    for raw in (ivy_ws, eve_ws, bob_ws):
        await raw.close()


@pytest.fixture
async def chats() -> AsyncIterator[list[SecureClient]]:
    opened: list[SecureClient] = []
    yield opened
    for c in opened:
        await c.client.close()


async def next_message(chat: SecureClient) -> Decrypted:
    it = chat.messages()
    async with asyncio.timeout(5):
        return await anext(it)


async def test_the_secure_client_tells_two_users_same_named_devices_apart(
    node: Node, chats: list[SecureClient]
) -> None:
    """The client library reads the sender's signing key by (user, device): with two users'
    devices named alike it still verifies each message against its sender's key."""
    ann, ben, cid = uid("ann"), uid("ben"), uid("cid")
    room = f"room:{uid('r')}"
    for u in (ann, ben, cid):
        node.add_member(room, u)
    clients = {}
    for u in (ann, ben, cid):
        keys = DeviceKeys.generate("phone")  # the same name for all three
        clients[u] = SecureClient(node.url, token(u, device="phone"), u, keys)
        await clients[u].start()
        chats.append(clients[u])
        await clients[u].subscribe(room)
    await clients[ann].send(room, "from ann")
    for reader in (ben, cid):
        got = await next_message(clients[reader])
        assert (got.user, got.text, got.error) == (ann, "from ann", None)
    await clients[ben].send(room, "from ben")  # cid has cached ann's "phone" key by now
    got = await next_message(clients[cid])
    assert (got.user, got.text, got.error) == (ben, "from ben", None)


def test_the_client_library_picks_random_device_ids() -> None:
    ids = {DeviceKeys.generate().device for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"d-[A-Za-z0-9_-]{22}", d) for d in ids), ids
    assert DeviceKeys.generate("kept").device == "kept"  # an app's existing id stays


OLD_DEVICES = [
    ("ivy-phone", "eve", b"e" * 32, b"f" * 32, 1),
    ("ivy-laptop", "ivy", b"i" * 32, b"j" * 32, 2),
]
OLD_KEYS = [("room:a", "ivy-laptop", "k1", b"S" * 80, "ivy-laptop", 3)]


async def check_migrated(store: Any) -> None:
    """What an earlier schema held is there under (user, device); the squatted name is free
    for its rightful owner now."""
    keys = store.keys
    assert (await keys.device("ivy", "ivy-laptop")).signing_key == b"j" * 32
    assert (await keys.device("eve", "ivy-phone")).identity_key == b"e" * 32
    assert await keys.fetch("room:a", "ivy", "ivy-laptop", None) == ("k1", b"S" * 80)
    from realtime_safety.storage import Device

    mine = Device("ivy-phone", "ivy", b"m" * 32, b"n" * 32, 9)
    assert await keys.register(mine) == mine
    assert await keys.share("room:a", "k2", {("ivy", "ivy-phone"): b"T" * 80}, None, 10) == []
    assert await keys.fetch("room:a", "ivy", "ivy-phone", None) == ("k2", b"T" * 80)
    assert await keys.fetch("room:a", "eve", "ivy-phone", None) is None
    assert [d.device for d in await keys.devices_of(["ivy"])] == ["ivy-laptop", "ivy-phone"]
    dumped = [r async for r in store.dump("channel_keys")]
    assert {(r["user"], r["device"], r["key_id"]) for r in dumped} == {
        ("ivy", "ivy-laptop", "k1"),
        ("ivy", "ivy-phone", "k2"),
    }


async def test_a_sqlite_database_of_global_device_ids_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "realtime.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    for version, script in enumerate(SQLITE_MIGRATIONS[:3], start=1):
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
        db.execute(f"PRAGMA user_version={version}")
    db.executemany("INSERT INTO devices VALUES (?,?,?,?,?)", OLD_DEVICES)
    db.executemany(
        "INSERT INTO channel_keys (channel, device, key_id, sealed, from_device, ts) "
        "VALUES (?,?,?,?,?,?)",
        OLD_KEYS,
    )
    db.close()
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        assert await store.schema_version() == len(SQLITE_MIGRATIONS) >= 4
        await check_migrated(store)
        # the old tables are left as they were: the step only added
        old = await store._reader.run(
            lambda c: c.execute("SELECT COUNT(*) FROM devices").fetchone()
        )
        assert old == (2,)
    finally:
        await store.close()
    again = SqliteStore(tmp_path)  # opening again migrates nothing twice
    await again.open()
    try:
        assert len(await again.keys.devices_of(["ivy"])) == 2
    finally:
        await again.close()


async def test_a_mongodb_database_of_global_device_ids_is_migrated(mongo_uri: str) -> None:
    name = unique_db()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        db = client[name]
        for step in MONGO_MIGRATIONS[:3]:
            await step(db)
        await db["meta"].update_one({"_id": "schema"}, {"$set": {"version": 3}}, upsert=True)
        fields = ("device", "user", "identity_key", "signing_key", "ts")
        await db["devices"].insert_many([dict(zip(fields, d, strict=True)) for d in OLD_DEVICES])
        kfields = ("channel", "device", "key_id", "sealed", "from_device", "ts")
        await db["channel_keys"].insert_many([dict(zip(kfields, k, strict=True)) for k in OLD_KEYS])
        # two nodes of the new version start at once: both run the step
        await asyncio.gather(*(MONGO_MIGRATIONS[3](db) for _ in range(4)))
        store = MongoStore(mongo_uri, name)
        await store.open()
        try:
            assert await store.schema_version() == len(MONGO_MIGRATIONS) >= 4
            await check_migrated(store)
        finally:
            await store.close()
        again = MongoStore(mongo_uri, name)  # and again, on the migrated data
        await MONGO_MIGRATIONS[3](again._db)
        try:
            assert len(await again.keys.devices_of(["ivy"])) == 2
        finally:
            await again.close()
    finally:
        await client.drop_database(name)
        await client.close()


@pytest.mark.parametrize("backend", ["sqlite", "mongodb"])
async def test_an_export_of_global_device_ids_imports_under_their_users(
    backend: str, tmp_path: Path, mongo_uri: str
) -> None:
    """`realtime import` of an export written before device ids were scoped: its sealed keys
    carry no `user`, and go to the one user with a device of that id."""
    store: Any = (
        SqliteStore(tmp_path) if backend == "sqlite" else MongoStore(mongo_uri, unique_db())
    )
    await store.open()
    try:
        fields = ("device", "user", "identity_key", "signing_key", "ts")
        devices = [dict(zip(fields, d, strict=True)) for d in OLD_DEVICES]
        kfields = ("channel", "device", "key_id", "sealed", "from_device", "ts")
        keys = [dict(zip(kfields, k, strict=True)) for k in OLD_KEYS]
        keys.append(dict(keys[0], device="nobody's"))  # no device of that id: left out
        assert await store.load("devices", devices) == 2
        assert await store.load("channel_keys", keys) == 1
        assert await store.keys.fetch("room:a", "ivy", "ivy-laptop", None) == ("k1", b"S" * 80)
    finally:
        await store.close()
