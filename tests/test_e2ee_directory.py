"""The v2 key directory and its transparency log through real server processes
(docs/e2ee/server.md, "Directory"): keys.publish, keys.query, keys.claim, keys.revoke,
keys.log and keys.consistency, checked with the client's own verifiers
(crypto.identity, crypto.transparency) over msgpack; a restart, and two nodes on one MongoDB."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import vodozemac
from conftest import Node, base_env, running_node, token, unique_db
from nacl.signing import SigningKey
from wire import Raw, b64

from realtime_safety.crypto.directory_v2 import certified_device
from realtime_safety.crypto.identity import DeviceCertificate, Revocation, UserKeyStatement
from realtime_safety.crypto.keylog import KeyLog
from realtime_safety.crypto.transparency import (
    LogMonitor,
    SignedTreeHead,
    parse_entry,
    verify_consistency,
    verify_head,
)
from realtime_safety.crypto.user_keys import UserKeys
from realtime_safety.storage.sqlite import SqliteStore

SEED = bytes(range(32))
LOG_PUB = bytes(SigningKey(SEED).verify_key)
MSGPACK = "rt.v1.msgpack"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    data = tmp_path_factory.mktemp("directory")
    (data / "kt.key").write_bytes(SEED)  # raw; hex is tested on the two-node cluster
    yield from running_node(data, "directory", RT_KT_SIGNING_KEY_FILE=str(data / "kt.key"))


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def now() -> int:
    return int(time.time() * 1000)


class Device:
    """A device with a real vodozemac account."""

    def __init__(self, name: str = "") -> None:
        self.id = name or uid("dev")
        self.account = vodozemac.Account()

    def cert(self, user: UserKeys) -> DeviceCertificate:
        return user.certify_account(self.account, self.id, now())


async def client(n: Node, user: str) -> Raw:
    return await Raw.open(n.url, token(user), proto=MSGPACK)


async def publish(
    raw: Raw, st: UserKeyStatement, cert: DeviceCertificate, otks: dict[str, bytes] | None = None
) -> dict[str, Any]:
    args: dict[str, Any] = {"user_key": st.to_wire(), "device": cert.to_wire()}
    if otks is not None:
        args["one_time_keys"] = otks
    return await raw.cmd("keys.publish", **args)


def head(reply: dict[str, Any]) -> SignedTreeHead:
    sth = SignedTreeHead.from_wire(reply["sth"])
    verify_head(LOG_PUB, sth)
    return sth


async def size_of(raw: Raw) -> int:
    return head(await raw.ok("keys.query", users=["nobody"])).size


async def entries_of(raw: Raw, user: str) -> list[tuple[str, Any]]:
    """(kind, parsed payload) of every log entry about `user`, their proofs checked."""
    reply = await raw.ok("keys.query", users=[user])
    monitor = LogMonitor(LOG_PUB)
    monitor.update(reply["sth"], [])
    out: list[tuple[str, Any]] = []
    for item in reply["users"][user]:
        entry = monitor.check_inclusion(item["entry"], item["index"], item["proof"], reply["sth"])
        out.append((entry.kind, msgpack.unpackb(entry.payload, raw=False)))
    return out


# --- publish ---------------------------------------------------------------------------------


async def test_publish_first_device_second_device_and_again_appends_nothing(node: Node) -> None:
    alice = uid("alice")
    keys, d1, d2 = UserKeys.generate(alice), Device(), Device()
    st, c1 = keys.announce(now()), d1.cert(keys)
    raw = await client(node, alice)
    first = await publish(raw, st, c1, {"k1": b"\x01" * 32, "k2": b"\x02" * 32})
    assert first["ok"], first
    assert first["device_index"] == first["user_index"] + 1
    assert first["one_time_keys"] == 2
    assert head(first).size == first["device_index"] + 1
    second = await raw.ok("keys.publish", user_key=st.to_wire(), device=d2.cert(keys).to_wire())
    assert second["user_index"] == first["user_index"]  # the same key: not appended again
    assert second["device_index"] > first["device_index"]
    assert second["one_time_keys"] == 0
    size = head(second).size
    again = await publish(raw, st, c1, {"k1": b"\x01" * 32, "k3": b"\x03" * 32})
    assert (again["user_index"], again["device_index"]) == (
        first["user_index"],
        first["device_index"],
    )
    assert again["one_time_keys"] == 3  # k1 was held already
    assert head(again).size == size
    kinds = [(k, p.get("device")) for k, p in await entries_of(raw, alice)]
    assert kinds == [("user-key", None), ("device", d1.id), ("device", d2.id)]
    await raw.close()


async def test_rotation_reset_and_certifying_again_under_the_new_key(node: Node) -> None:
    bob = uid("bob")
    old, d1 = UserKeys.generate(bob), Device()
    raw = await client(node, bob)
    await raw.ok(
        "keys.publish", user_key=old.announce(now()).to_wire(), device=d1.cert(old).to_wire()
    )
    new = UserKeys(bob, SigningKey.generate())
    rotation = new.announce(now(), rotated_from=old)
    rotated = await publish(raw, rotation, d1.cert(new))  # d1 certified again under the new key
    assert rotated["ok"], rotated
    assert rotated["device_index"] == rotated["user_index"] + 1
    reset = UserKeys(bob, SigningKey.generate())
    reset_reply = await raw.ok(
        "keys.publish", user_key=reset.announce(now()).to_wire(), device=d1.cert(reset).to_wire()
    )
    assert reset_reply["user_index"] > rotated["device_index"]
    found = await entries_of(raw, bob)
    user_keys = [UserKeyStatement.from_wire(p) for k, p in found if k == "user-key"]
    assert [s.user_pub for s in user_keys] == [old.public, new.public, reset.public]
    assert [s.is_rotation for s in user_keys] == [False, True, False]
    assert [k for k, _ in found] == ["user-key", "device"] * 3
    # a certificate under an earlier key for a device now certified under the current one
    refused = await publish(raw, reset.announce(now()), d1.cert(reset))
    assert refused["error"]["code"] == "conflict"  # another certificate under the same key
    await raw.close()


async def test_publish_refusals_append_nothing(node: Node) -> None:
    carol, mallory = uid("carol"), uid("mallory")
    keys, other, d1 = UserKeys.generate(carol), UserKeys.generate(carol), Device()
    st = keys.announce(now())
    raw, evil = await client(node, carol), await client(node, mallory)
    await raw.ok("keys.publish", user_key=st.to_wire(), device=d1.cert(keys).to_wire())
    size = await size_of(raw)

    async def refused(who: Raw, user_key: dict[str, Any], device: dict[str, Any]) -> str:
        reply = await who.cmd("keys.publish", user_key=user_key, device=device)
        assert reply["ok"] is False, reply
        return str(reply["error"]["code"])

    d2 = Device()
    # a certificate signed by another user key than the one published
    assert await refused(raw, st.to_wire(), d2.cert(other).to_wire()) == "forbidden"
    # the caller is not the user
    assert await refused(evil, st.to_wire(), d2.cert(keys).to_wire()) == "forbidden"
    # a user-key statement whose signature does not verify
    bad = {**st.to_wire(), "sig": bytes(64)}
    assert await refused(raw, bad, d2.cert(keys).to_wire()) == "forbidden"
    # a device id already certified for other device keys
    squat = Device(d1.id)
    assert await refused(raw, st.to_wire(), squat.cert(keys).to_wire()) == "conflict"
    # malformed: the answer names the argument
    assert await refused(raw, {"user": carol}, d2.cert(keys).to_wire()) == "bad_request"
    shapeless = await raw.cmd("keys.publish", user_key=st.to_wire(), device={"user": carol})
    assert shapeless["error"]["message"].startswith("'device': "), shapeless
    pipe = Device("a|b")
    assert await refused(raw, st.to_wire(), pipe.cert(keys).to_wire()) == "bad_request"
    bad_otk = await raw.cmd(
        "keys.publish",
        user_key=st.to_wire(),
        device=d2.cert(keys).to_wire(),
        one_time_keys={"k": b"x"},
    )
    assert bad_otk["error"]["code"] == "bad_request"
    assert await size_of(raw) == size
    # the controls: the same arguments, right, are accepted
    ok = await raw.ok("keys.publish", user_key=st.to_wire(), device=d2.cert(keys).to_wire())
    assert head(ok).size == size + 1
    await raw.close()
    await evil.close()


async def test_a_revoked_device_cannot_be_published_again(node: Node) -> None:
    dan = uid("dan")
    keys, d1 = UserKeys.generate(dan), Device()
    st, cert = keys.announce(now()), d1.cert(keys)
    raw = await client(node, dan)
    await raw.ok("keys.publish", user_key=st.to_wire(), device=cert.to_wire())
    await raw.ok("keys.revoke", revocation=keys.revoke(d1.id, now()).to_wire())
    reply = await publish(raw, st, cert)
    assert reply["error"]["code"] == "conflict"
    await raw.close()


# --- query, log, consistency ------------------------------------------------------------------


async def test_query_proofs_verify_and_older_heads_are_consistent(node: Node) -> None:
    erin, fred = uid("erin"), uid("fred")
    raw = await client(node, erin)
    fred_raw = await client(node, fred)
    ek, fk = UserKeys.generate(erin), UserKeys.generate(fred)
    await raw.ok(
        "keys.publish", user_key=ek.announce(now()).to_wire(), device=Device().cert(ek).to_wire()
    )
    old = await raw.ok("keys.query", users=[erin])
    monitor = LogMonitor(LOG_PUB)
    monitor.update(old["sth"], old["consistency"])
    await fred_raw.ok(
        "keys.publish", user_key=fk.announce(now()).to_wire(), device=Device().cert(fk).to_wire()
    )
    await raw.ok(
        "keys.publish", user_key=ek.announce(now()).to_wire(), device=Device().cert(ek).to_wire()
    )
    old_sth = SignedTreeHead.from_wire(old["sth"])
    new = await raw.ok("keys.query", users=[erin, fred, "nobody"], since=old_sth.size)
    monitor.update(new["sth"], new["consistency"])  # raises unless consistent
    new_sth = head(new)
    assert new_sth.size == old_sth.size + 3  # erin's key again is not appended again
    for user, count in ((erin, 3), (fred, 2)):
        items = new["users"][user]
        assert len(items) == count
        assert [i["index"] for i in items] == sorted(i["index"] for i in items)
        for item in items:
            entry = monitor.check_inclusion(item["entry"], item["index"], item["proof"], new["sth"])
            assert entry.user == user
    assert new["users"]["nobody"] == []
    assert new["log_key"] == LOG_PUB  # the configured key (RT_KT_SIGNING_KEY_FILE)
    # a proof for the wrong index does not verify (the check is real)
    item = new["users"][erin][0]
    with pytest.raises(Exception, match="inclusion"):
        monitor.check_inclusion(item["entry"], item["index"] + 1, item["proof"], new["sth"])
    # keys.consistency between the two heads
    proof = (await raw.ok("keys.consistency", first=old_sth.size, second=new_sth.size))["proof"]
    assert verify_consistency(old_sth.size, new_sth.size, old_sth.root, new_sth.root, proof)
    assert not verify_consistency(old_sth.size, new_sth.size, new_sth.root, new_sth.root, proof)
    # since beyond the log, and bad users
    assert await raw.error("keys.query", users=[erin], since=new_sth.size + 10) == "bad_request"
    assert await raw.error("keys.query", users=[]) == "bad_request"
    assert await raw.error("keys.query", users=["x"] * 101) == "bad_request"
    await raw.close()
    await fred_raw.close()


async def test_log_and_consistency_arguments(node: Node) -> None:
    gina = uid("gina")
    gk = UserKeys.generate(gina)
    raw = await client(node, gina)
    for _ in range(2):  # three entries of her own at least, whichever test ran first
        await raw.ok(
            "keys.publish",
            user_key=gk.announce(now()).to_wire(),
            device=Device().cert(gk).to_wire(),
        )
    sth = head(await raw.ok("keys.query", users=[gina]))
    got = await raw.ok("keys.log", start=0, end=sth.size)
    log_sth = head(got)
    assert len(got["entries"]) == sth.size
    # the entries rebuild the head's root: an owner's scan from 0
    monitor = LogMonitor(LOG_PUB)
    monitor.update(got["sth"], [])
    mine = monitor.own_entries(enumerate(got["entries"]), gina)
    assert [e.kind for _, e in mine] == ["user-key", "device", "device"]
    # a new device starts its scan at the head with the frontier
    fresh = LogMonitor(LOG_PUB)
    fresh.update(got["sth"], [])
    fresh.start_scan(log_sth.size, got["frontier"])
    part = await raw.ok("keys.log", start=1, end=3)
    assert part["entries"] == got["entries"][1:3]
    assert parse_entry(part["entries"][0]) is not None
    assert (await raw.ok("keys.log", start=2, end=2))["entries"] == []
    for bad in (
        {"start": 3, "end": 2},
        {"start": 0, "end": log_sth.size + 1},
        {"start": 0},
        {"start": -1, "end": 1},
        {"start": 0, "end": 1001},
    ):
        assert await raw.error("keys.log", **bad) == "bad_request", bad
    size = log_sth.size
    assert (await raw.ok("keys.consistency", first=size, second=size))["proof"] == []
    assert (await raw.ok("keys.consistency", first=1, second=size))["proof"]
    for bad in (
        {"first": 0, "second": 1},
        {"first": 2, "second": 1},
        {"first": 1, "second": size + 1},
        {"first": 1},
    ):
        assert await raw.error("keys.consistency", **bad) == "bad_request", bad
    await raw.close()


# --- claim -----------------------------------------------------------------------------------


async def test_each_one_time_key_is_claimed_once(node: Node) -> None:
    hal, ivy = uid("hal"), uid("ivy")
    hk, d1, d2 = UserKeys.generate(hal), Device(), Device()
    raw, other = await client(node, hal), await client(node, ivy)
    otks = {"a": b"\x0a" * 32, "b": b"\x0b" * 32}
    st = hk.announce(now())
    await raw.ok(
        "keys.publish", user_key=st.to_wire(), device=d1.cert(hk).to_wire(), one_time_keys=otks
    )
    await raw.ok("keys.publish", user_key=st.to_wire(), device=d2.cert(hk).to_wire())  # none
    want = [{"user": hal, "device": d1.id}, {"user": hal, "device": d2.id}]
    unknown = [{"user": hal, "device": "nope"}]
    first = (await other.ok("keys.claim", devices=want + unknown))["keys"]
    second = (await other.ok("keys.claim", devices=want))["keys"]
    third = (await other.ok("keys.claim", devices=want))["keys"]
    assert [(k["user"], k["device"]) for k in first + second] == [(hal, d1.id)] * 2
    assert {k["key_id"]: k["key"] for k in first + second} == otks
    assert third == []
    assert await other.error("keys.claim", devices=[]) == "bad_request"
    assert await other.error("keys.claim", devices=[{"user": hal}]) == "bad_request"
    assert await other.error("keys.claim", devices=want * 51) == "bad_request"
    await raw.close()
    await other.close()


# --- revoke ----------------------------------------------------------------------------------


async def test_revoke_by_user_key_and_by_the_device(node: Node, tmp_path: Path) -> None:
    jo, mallory = uid("jo"), uid("mallory")
    jk, d1, d2, d3 = UserKeys.generate(jo), Device(), Device(), Device()
    raw, evil = await client(node, jo), await client(node, mallory)
    st = jk.announce(now())
    for d in (d1, d2, d3):
        await raw.ok(
            "keys.publish",
            user_key=st.to_wire(),
            device=d.cert(jk).to_wire(),
            one_time_keys={"k": bytes(32)},
        )
    records = SqliteStore(Path(node.env["RT_DATA_DIR"]))
    await records.open()
    try:
        assert await certified_device(records.records, jo, d1.id) is not None
        for d in (d1, d3):  # to-device messages waiting (the records layout of server.md)
            suffix = f"{1_000_000_000_000:013d}|r{d.id}"
            await records.records.insert(
                "todevice", f"{jo}|{d.id}|{suffix}", {"id": suffix, "ts": 1}, ix=1
            )
        # refused: another key's signature, a device's revocation of another device, the
        # caller not the user, a device that does not exist
        forged = UserKeys(jo, SigningKey.generate()).revoke(d1.id, now())
        assert await raw.error("keys.revoke", revocation=forged.to_wire()) == "forbidden"
        by_d2 = Revocation.by_own_device(d2.account, jo, d1.id, now())
        assert await raw.error("keys.revoke", revocation=by_d2.to_wire()) == "forbidden"
        rev = jk.revoke(d1.id, now())
        assert await evil.error("keys.revoke", revocation=rev.to_wire()) == "forbidden"
        ghost = jk.revoke("ghost", now())
        assert await raw.error("keys.revoke", revocation=ghost.to_wire()) == "not_found"
        assert await raw.error("keys.revoke", revocation={"user": jo}) == "bad_request"
        assert await certified_device(records.records, jo, d1.id) is not None
        # by the user key
        done = await raw.ok("keys.revoke", revocation=rev.to_wire())
        assert head(done).size == done["index"] + 1
        assert await certified_device(records.records, jo, d1.id) is None
        again = await raw.ok("keys.revoke", revocation=jk.revoke(d1.id, now()).to_wire())
        assert again["index"] == done["index"]  # revoked once, logged once
        # by the device itself
        self_rev = Revocation.by_own_device(d2.account, jo, d2.id, now())
        assert (await raw.ok("keys.revoke", revocation=self_rev.to_wire()))["index"] > done["index"]
        assert await certified_device(records.records, jo, d2.id) is None
        assert await certified_device(records.records, jo, d3.id) is not None
        # their one-time keys went with them; d3's is still there
        devices = [{"user": jo, "device": d.id} for d in (d1, d2, d3)]
        claimed = (await evil.ok("keys.claim", devices=devices))["keys"]
        assert [k["device"] for k in claimed] == [d3.id]
        assert not await records.records.prefix("otk", f"{jo}|{d1.id}|", 10)
        assert not await records.records.prefix("todevice", f"{jo}|{d1.id}|", 10)
        assert len(await records.records.prefix("todevice", f"{jo}|{d3.id}|", 10)) == 1
        kinds = [k for k, _ in await entries_of(raw, jo)]
        assert kinds == ["user-key", "device", "device", "device", "revoke", "revoke"]
    finally:
        await records.close()
    await raw.close()
    await evil.close()


# --- persistence ------------------------------------------------------------------------------


async def test_the_log_and_its_key_survive_a_restart(node_factory: Any) -> None:
    n: Node = node_factory("restart")
    kim = uid("kim")
    kk = UserKeys.generate(kim)
    raw = await client(n, kim)
    for _ in range(3):
        st, cert = kk.announce(now()), Device().cert(kk)
        await raw.ok("keys.publish", user_key=st.to_wire(), device=cert.to_wire())
    before = SignedTreeHead.from_wire((await raw.ok("keys.query", users=[kim]))["sth"])
    await raw.close()
    n.stop()
    n.start()
    raw = await client(n, kim)
    # the first op after the restart appends nothing: its head is the whole log all the same
    same = await raw.ok("keys.publish", user_key=st.to_wire(), device=cert.to_wire())
    assert SignedTreeHead.from_wire(same["sth"]).size == before.size
    after_reply = await raw.ok("keys.query", users=[kim], since=before.size)
    after = SignedTreeHead.from_wire(after_reply["sth"])
    assert (after.size, after.root) == (before.size, before.root)
    assert after_reply["consistency"] == []
    await raw.ok(
        "keys.publish", user_key=kk.announce(now()).to_wire(), device=Device().cert(kk).to_wire()
    )
    grown = await raw.ok("keys.query", users=[kim], since=before.size)
    grown_sth = SignedTreeHead.from_wire(grown["sth"])
    assert grown_sth.size == before.size + 1
    assert verify_consistency(
        before.size, grown_sth.size, before.root, grown_sth.root, grown["consistency"]
    )
    await raw.close()
    n.stop()
    store = SqliteStore(Path(n.env["RT_DATA_DIR"]))
    await store.open()
    try:
        meta = await store.records.get("kt.meta", "signing-key")
    finally:
        await store.close()
    assert meta is not None
    pub = bytes(SigningKey(meta["seed"]).verify_key)
    assert after_reply["log_key"] == pub
    for sth in (before, after, grown_sth):  # one key, generated once and kept
        verify_head(pub, sth)


# --- two nodes on one MongoDB ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mongo_pair(
    tmp_path_factory: pytest.TempPathFactory, mongo_uri: str
) -> Iterator[tuple[Node, Node]]:
    env = {
        "RT_MONGODB_URI": mongo_uri,
        "RT_MONGODB_DB": unique_db(),
        "RT_STORE_TIMEOUT_S": "10",
        "RT_KT_SIGNING_KEY": SEED.hex(),
    }
    nodes = []
    try:
        for name in ("a", "b"):
            data = tmp_path_factory.mktemp(f"kt-{name}")
            nodes.append(Node(base_env(data, RT_NODE_ID=f"kt-{name}", **env), name).start())
        yield nodes[0], nodes[1]
    finally:
        for n in nodes:
            n.stop()


async def test_two_nodes_append_one_log_and_hand_out_each_key_once(
    mongo_pair: tuple[Node, Node],
) -> None:
    a, b = mongo_pair
    users = [uid("u") for _ in range(6)]
    raws = [await client(a if i % 2 else b, u) for i, u in enumerate(users)]
    keys = [UserKeys.generate(u) for u in users]
    otks = {f"k{i}": bytes([i]) * 32 for i in range(12)}
    devices = [Device() for _ in users]

    async def publish_one(i: int) -> dict[str, Any]:
        st, cert = keys[i].announce(now()), devices[i].cert(keys[i])
        return await raws[i].ok(
            "keys.publish", user_key=st.to_wire(), device=cert.to_wire(), one_time_keys=otks
        )

    done = await asyncio.gather(*(publish_one(i) for i in range(len(users))))
    indices = [d[k] for d in done for k in ("user_index", "device_index")]
    assert len(set(indices)) == len(indices)  # racing nodes: one order, no index twice
    qa, qb = await client(a, "watcher"), await client(b, "watcher")
    ra, rb = (await qa.ok("keys.query", users=users)), (await qb.ok("keys.query", users=users))
    ha, hb = head(ra), head(rb)  # both nodes sign with the configured key
    assert (ha.size, ha.root) == (hb.size, hb.root)
    for user in users:
        assert [i["entry"] for i in ra["users"][user]] == [i["entry"] for i in rb["users"][user]]
        assert len(ra["users"][user]) == 2
    # one device's keys claimed from both nodes at once: each handed out once
    target = [{"user": users[0], "device": devices[0].id}]
    claimers = [await client(a if i % 2 else b, uid("c")) for i in range(len(otks) + 4)]
    claims = await asyncio.gather(*(c.ok("keys.claim", devices=target) for c in claimers))
    got = [k["key_id"] for c in claims for k in c["keys"]]
    assert sorted(got) == sorted(otks)
    for r in (*raws, *claimers, qa, qb):
        await r.close()


# --- JSON clients and limits -------------------------------------------------------------------


async def test_a_json_client_sends_and_gets_base64(node: Node) -> None:
    lea = uid("lea")
    lk, d1 = UserKeys.generate(lea), Device()
    st, cert = lk.announce(now()).to_wire(), d1.cert(lk).to_wire()
    raw = await Raw.open(node.url, token(lea))  # rt.v1.json
    otks = {f"k{i}": bytes([i]) * 32 for i in range(60)}
    reply = await raw.ok(
        "keys.publish",
        user_key=b64(st),
        device=b64(cert),
        one_time_keys=b64(otks),
    )
    assert reply["one_time_keys"] == 60
    more = {f"m{i}": bytes([i]) * 32 for i in range(60)}
    again = await raw.ok(
        "keys.publish",
        user_key=b64(st),
        device=b64(cert),
        one_time_keys=b64(more),
    )
    assert again["one_time_keys"] == 100  # at most 100 held per device
    assert again["user_index"] == reply["user_index"]
    raw_json = await raw.ok("keys.query", users=[lea])
    items = raw_json["users"][lea]
    sth = SignedTreeHead.from_wire(base64.b64decode(raw_json["sth"]))
    verify_head(LOG_PUB, sth)
    monitor = LogMonitor(LOG_PUB)
    monitor.update(sth, [])
    for item in items:
        proof = [base64.b64decode(p) for p in item["proof"]]
        monitor.check_inclusion(base64.b64decode(item["entry"]), item["index"], proof, sth)
    not_b64 = {**b64(st), "user_pub": "%%%"}
    code = await raw.error("keys.publish", user_key=not_b64, device=b64(cert))
    assert code == "bad_request"
    await raw.close()


# --- the log's store, as two nodes share it ---------------------------------------------------


async def test_two_logs_on_one_store_form_one_order_across_blocks(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    await store.open()
    try:
        a, b = KeyLog(store.records, SEED, block=10), KeyLog(store.records, SEED, block=10)

        async def add(log: KeyLog, n: int, user: str) -> list[int]:
            return [await log.append("device", user, bytes([i])) for i in range(n)]

        from_a, from_b = await asyncio.gather(add(a, 17, "ann"), add(b, 17, "ben"))
        assert sorted(from_a + from_b) == list(range(34))
        await a.sync()
        await b.sync()
        fresh = KeyLog(store.records, SEED, block=10)
        assert await fresh.sync() == 34
        heads = [await log.head() for log in (a, b, fresh)]
        assert len({(h.size, h.root) for h in heads}) == 1
        assert fresh.indices("ann", 34) == from_a and fresh.indices("ben", 34) == from_b
        assert await fresh.entries(5, 27) == await a.entries(5, 27)
        assert [parse_entry(e).user for e in await fresh.entries(0, 34)] == [
            "ann" if i in from_a else "ben" for i in range(34)
        ]
    finally:
        await store.close()


def test_the_log_key_setting(tmp_path: Path) -> None:
    from realtime_safety.realtime import config

    base = {"RT_JWT_SECRET": "s" * 32, "RT_DATA_DIR": str(tmp_path)}
    assert config.load(base).kt_signing_seed is None
    raw_file, hex_file, bad_file = tmp_path / "raw", tmp_path / "hex", tmp_path / "bad"
    raw_file.write_bytes(SEED)
    hex_file.write_text(SEED.hex() + "\n")
    bad_file.write_text("not a key")
    for env in (
        {"RT_KT_SIGNING_KEY_FILE": str(raw_file)},
        {"RT_KT_SIGNING_KEY_FILE": str(hex_file)},
        {"RT_KT_SIGNING_KEY": SEED.hex()},
    ):
        assert config.load({**base, **env}).kt_signing_seed == SEED, env
    for env in (
        {"RT_KT_SIGNING_KEY_FILE": str(bad_file)},
        {"RT_KT_SIGNING_KEY_FILE": str(tmp_path / "missing")},
        {"RT_KT_SIGNING_KEY": SEED.hex()[:-2]},
        {"RT_KT_SIGNING_KEY": SEED.hex(), "RT_KT_SIGNING_KEY_FILE": str(hex_file)},
    ):
        with pytest.raises(config.ConfigError, match="RT_KT_SIGNING_KEY"):
            config.load({**base, **env})
