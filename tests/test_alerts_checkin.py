"""Check-in timers, the dead-man switch (docs/protocol.md, "Check-in timers"), on real server
processes: two nodes on one MongoDB and one Redis fire each missed check-in once, within 2 s
of its expiry, through a Redis restart and through a node killed right after claiming one;
checking in or moving the timer in time prevents or defers the alert; only the owner touches
a check-in; the duress PIN stops it in appearance only."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from conftest import Node, RedisServer, base_env, token, unique_db
from pymongo import MongoClient
from wire import Raw, until

from realtime_safety.alerts.cancel import DURESS_NOTE
from realtime_safety.loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.52, "lon": 13.405}
NEARBY = {"lat": 52.521, "lon": 13.406}
PIN, DURESS = "2468", "1357"


def _people(node: Node) -> tuple[str, str, str]:
    """An owner whose tier-1 contacts are a phone and an app user: (owner, phone, friend)."""
    tag = uuid.uuid4().hex[:6]
    owner, friend, phone = f"olga-{tag}", f"bob-{tag}", f"+1555{uuid.uuid4().int % 10**7:07d}"
    contacts = [{"tier": 1, "phone": phone}, {"tier": 1, "user": friend}]
    r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": contacts})
    assert r.status_code == 200, r.text
    return owner, phone, friend


def _sent_at(fakes: FakeProviders, phone: str) -> list[float]:
    """When each SMS to `phone` reached the provider (ms since the epoch)."""
    return [r.at * 1000 for r in fakes.sms if r.body.get("To") == phone]


def _cluster(tmp_path: Path, fakes: FakeProviders, redis: RedisServer, mongo_uri: str) -> Any:
    db = unique_db()
    env = {
        "RT_REDIS_URL": redis.url,
        "RT_MONGODB_URI": mongo_uri,
        "RT_MONGODB_DB": db,
        "RT_STORE_TIMEOUT_S": "10",
        "RT_ALERT_RECONCILE_S": "1",
        "RT_ALERT_RETRY_BASE_S": "0.05",
        **fakes.env(tmp_path),
    }
    return db, env


def _settled(alert: dict[str, Any]) -> bool:
    """Nothing of the plan is left to do: the alert is due only for its escalation."""
    return bool(alert["_ix"] == alert["next_escalation"])


class Docs:
    """The shared store's documents, read directly (what the nodes agreed on)."""

    def __init__(self, mongo_uri: str, db: str) -> None:
        self._col = MongoClient(mongo_uri)[db]["docs"]

    async def find(self, coll: str, **match: Any) -> list[dict[str, Any]]:
        query = {"coll": coll, **{"ix" if k == "_ix" else f"doc.{k}": v for k, v in match.items()}}
        found = await asyncio.to_thread(lambda: list(self._col.find(query)))
        return [{**d["doc"], "_ix": d["ix"]} for d in found]


async def test_missed_checkins_fire_once_on_time_on_two_nodes_through_a_redis_restart(
    tmp_path: Path, fakes: FakeProviders, redis_server: RedisServer, mongo_uri: str
) -> None:
    db, env = _cluster(tmp_path, fakes, redis_server, mongo_uri)
    nodes = [Node(base_env(tmp_path / n, RT_NODE_ID=n, **env), n) for n in ("a", "b")]
    for n in nodes:
        n.start()
    docs = Docs(mongo_uri, db)
    try:
        people = [_people(nodes[0]) for _ in range(3)]
        phones = [phone for _, phone, _ in people]
        started = []
        for i, (owner, _, _) in enumerate(people):
            conn = await Raw.open(nodes[i % 2].url, token(owner))
            reply = await conn.ok(
                "checkin.start",
                duration_s=3 + i * 0.5,
                location=HERE,
                note="walking home",
                client_checkin_id="walk",
            )
            assert reply["state"] == "running"
            # the phone moves on, through the other node
            other = await Raw.open(nodes[(i + 1) % 2].url, token(owner))
            await other.ok("checkin.location", checkin_id=reply["checkin_id"], location=NEARBY)
            await other.close()
            await conn.close()
            started.append(reply)
        # Redis loses everything while the timers run (they live in the store).
        redis_server.stop()
        redis_server.start()

        async def settled() -> list[dict[str, Any]] | None:
            alerts = await docs.find("alerts", kind="checkin_missed")
            fired = await docs.find("checkins", state="fired")
            mine = [a for a in alerts if a["owner"] in {o for o, _, _ in people}]
            done = len(fired) >= 3 and all(_settled(a) for a in mine)
            return mine if done and len(mine) >= 3 else None

        alerts = await until(settled, 40, what="every alert raised and its plan finished")
        assert sorted(a["owner"] for a in alerts) == sorted(o for o, _, _ in people)  # once each
        by_owner = {a["owner"]: a for a in alerts}
        for (owner, _phone, friend), reply in zip(people, started, strict=True):
            alert = by_owner[owner]
            assert alert["id"] == reply["alert_id"]
            error_ms = alert["created"] - reply["expires_at"]
            assert 0 <= error_ms <= 2000, f"fired {error_ms} ms after expiry"
            assert alert["location"]["lat"] == NEARBY["lat"]  # the last known location
            assert alert["note"] == "walking home" and alert["users"] == [friend]
        await until(lambda: all(_sent_at(fakes, p) for p in phones), 20, what="every SMS")
        assert [len(_sent_at(fakes, p)) for p in phones] == [1, 1, 1]
        # The trail sent while the timer ran is the alert's.
        owner, _, friend = people[0]
        bob = await Raw.open(nodes[1].url, token(friend))
        trail = await bob.ok("alert.trail", alert_id=started[0]["alert_id"])
        assert [p["lat"] for p in trail["points"]] == [HERE["lat"], NEARBY["lat"]]
    finally:
        for n in nodes:
            n.stop()


async def test_a_node_killed_right_after_claiming_leaves_the_alert_to_another(
    tmp_path: Path, fakes: FakeProviders, redis_server: RedisServer, mongo_uri: str
) -> None:
    db, env = _cluster(tmp_path, fakes, redis_server, mongo_uri)
    a = Node(
        base_env(tmp_path / "a", RT_NODE_ID="a", RT_FAULT_KILL_AT="checkin:claimed", **env),
        "a",
        "realtime_safety.loadtests.faults.node",
    ).start()
    b = Node(base_env(tmp_path / "b", RT_NODE_ID="b", **env), "b")
    docs = Docs(mongo_uri, db)
    try:
        owner, phone, _ = _people(a)
        olga = await Raw.open(a.url, token(owner))
        reply = await olga.ok("checkin.start", duration_s=1, location=HERE)
        assert await asyncio.to_thread(a.wait, 20) != 0
        assert "fault: killed at checkin:claimed" in a.log()
        claimed = await docs.find("checkins", id=reply["checkin_id"])
        assert claimed[0]["state"] == "firing"  # claimed, and nothing raised yet:
        assert await docs.find("alerts", id=reply["alert_id"]) == []
        b.start()  # another node finds the claim stale and finishes it
        await until(lambda: _sent_at(fakes, phone), 20, what="the SMS")

        async def settled() -> list[dict[str, Any]] | None:
            alerts = await docs.find("alerts", id=reply["alert_id"])
            return alerts if alerts and all(_settled(a) for a in alerts) else None

        assert len(await until(settled, 20, what="the plan finished")) == 1
        # The killed node comes back: nothing fires twice. Sentinel: a check-in started on
        # it afterwards fires; by then a second alert for the first would have been raised.
        del a.env["RT_FAULT_KILL_AT"]
        a.start()
        other, other_phone, _ = _people(a)
        conn = await Raw.open(a.url, token(other))
        await conn.ok("checkin.start", duration_s=1, location=HERE)
        await until(lambda: _sent_at(fakes, other_phone), 20, what="the sentinel's SMS")
        assert len(_sent_at(fakes, phone)) == 1
        assert len(await docs.find("alerts", owner=owner)) == 1
    finally:
        a.stop()
        b.stop()


async def test_checking_in_or_moving_the_timer_in_time_prevents_or_defers_the_alert(
    alert_node: Node, fakes: FakeProviders
) -> None:
    owner, phone, _friend = _people(alert_node)
    olga = await Raw.open(alert_node.url, token(owner))
    await olga.ok("subscribe", channel=f"user:{owner}")
    a = await olga.ok("checkin.start", duration_s=2, location=HERE, client_checkin_id="a")
    b = await olga.ok("checkin.start", duration_s=2, location=HERE, client_checkin_id="b")
    c = await olga.ok("checkin.start", duration_s=2, location=HERE, client_checkin_id="c")
    done = await olga.ok("checkin.done", checkin_id=a["checkin_id"])
    assert done["state"] == "done" and "expires_at" not in done
    again = await olga.ok("checkin.done", checkin_id=a["checkin_id"])  # a retry
    assert again["state"] == "done"
    assert await olga.error("checkin.location", checkin_id=a["checkin_id"], location=HERE) == (
        "conflict"
    )
    moved = await olga.ok("checkin.extend", checkin_id=b["checkin_id"], duration_s=4)
    assert moved["expires_at"] >= b["expires_at"] + 1500
    # c, untouched, fires first: its notice is the first push (a's would have come with it).
    await olga.nothing_before({"push": "checkin.missed", "checkin_id": c["checkin_id"]}, timeout=10)
    await olga.nothing_before({"push": "checkin.missed", "checkin_id": b["checkin_id"]}, timeout=10)
    await until(lambda: len(_sent_at(fakes, phone)) == 2, 10, what="two SMS")
    first, second = _sent_at(fakes, phone)
    assert c["expires_at"] <= first and second >= moved["expires_at"]  # b waited
    assert await olga.error("alert.status", alert_id=a["alert_id"]) == "not_found"
    for checkin in (b, c):
        status = await olga.ok("alert.status", alert_id=checkin["alert_id"])
        assert status["state"] == "active"
        assert await olga.error("checkin.done", checkin_id=checkin["checkin_id"]) == "conflict"
        assert (
            await olga.error("checkin.extend", checkin_id=checkin["checkin_id"], duration_s=60)
            == "conflict"
        )
    mod = await Raw.open(alert_node.url, token("mia", roles=["user", "moderator"]))
    seen = await mod.ok("alert.status", alert_id=c["alert_id"])
    assert seen["checkin_id"] == c["checkin_id"] and seen["duress"] is False


async def test_only_the_owner_touches_a_checkin_within_its_limits(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = Node(
        base_env(tmp_path / "n", RT_ALERT_TRIGGER_LIMIT="2", **fakes.env(tmp_path)), "n"
    ).start()
    try:
        owner, _, _ = _people(node)
        olga = await Raw.open(node.url, token(owner))
        eve = await Raw.open(node.url, token("eve"))
        running = [
            await olga.ok("checkin.start", duration_s=600, location=HERE, client_checkin_id=c)
            for c in ("1", "2", "3")
        ]
        retry = await olga.ok("checkin.start", duration_s=600, location=HERE, client_checkin_id="1")
        assert retry["checkin_id"] == running[0]["checkin_id"]  # the same one, no new slot
        assert await olga.error("checkin.start", duration_s=600, location=HERE) == "too_large"
        mine = running[0]["checkin_id"]
        for op, args in (
            ("checkin.done", {}),
            ("checkin.extend", {"duration_s": 60}),
            ("checkin.location", {"location": NEARBY}),
        ):
            assert await eve.error(op, checkin_id=mine, **args) == "forbidden", op
            assert await olga.error(op, checkin_id="nope", **args) == "not_found", op
        assert await eve.error("alert.status", alert_id=running[0]["alert_id"]) == "not_found"
        for bad in (0, 0.5, 86_401, "60", True, None):
            assert await olga.error("checkin.start", duration_s=bad, location=HERE) == (
                "bad_request"
            ), bad
        assert await olga.error("checkin.start", duration_s=60) == "bad_request"  # no location
        assert (
            await olga.error("checkin.start", duration_s=60, location=HERE, note="x" * 501)
            == "bad_request"
        )
        assert (
            await olga.error("checkin.start", duration_s=60, location=HERE, client_checkin_id="")
            == "bad_request"
        )
        await olga.ok("checkin.done", checkin_id=mine)
        await olga.ok("checkin.start", duration_s=600, location=HERE, client_checkin_id="4")
        await olga.ok("checkin.done", checkin_id=running[1]["checkin_id"])
        # A user who has used up the alert limit starts no timer that would raise another.
        for cid in ("t1", "t2"):
            await olga.ok("alert.trigger", kind="sos", location=HERE, client_alert_id=cid)
        limited = await olga.cmd("checkin.start", duration_s=600, location=HERE)
        assert limited["error"]["code"] == "rate_limited", limited
        assert limited["error"]["retry_after_ms"] > 0
    finally:
        node.stop()


async def test_the_duress_pin_stops_a_checkin_in_appearance_only(
    alert_node: Node, fakes: FakeProviders
) -> None:
    owner, phone, friend = _people(alert_node)
    olga = await Raw.open(alert_node.url, token(owner))
    await olga.ok("subscribe", channel=f"user:{owner}")
    bob = await Raw.open(alert_node.url, token(friend))
    await bob.ok("subscribe", channel=f"user:{friend}")
    await olga.ok("pin.set", pin=PIN, duress_pin=DURESS)
    x = await olga.ok("checkin.start", duration_s=600, location=HERE)
    y = await olga.ok("checkin.start", duration_s=600, location=HERE)
    assert await olga.error("checkin.done", checkin_id=x["checkin_id"]) == "forbidden"
    assert await olga.error("checkin.done", checkin_id=x["checkin_id"], pin="0000") == "forbidden"
    x_done = await olga.ok("checkin.done", checkin_id=x["checkin_id"], pin=PIN)
    y_done = await olga.ok("checkin.done", checkin_id=y["checkin_id"], pin=DURESS)

    def same(reply: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in reply.items() if k not in ("id", "checkin_id", "alert_id")}

    assert same(y_done) == same(x_done) == {"ok": True, "state": "done"}
    # The alarm is out at once, ten minutes before the timer would have ended, flagged.
    await until(lambda: _sent_at(fakes, phone), 10, what="the duress alert's SMS")
    assert _sent_at(fakes, phone)[0] < y["expires_at"] - 500_000
    assert "DURESS" in next(r.body["Body"] for r in fakes.sms if r.body.get("To") == phone)
    alert = await bob.push()
    assert alert["alert_id"] == y["alert_id"] and alert["kind"] == "checkin_missed"
    assert alert["note"] == DURESS_NOTE  # no note of the owner's
    # To the phone it is a check-in like the other: no alert to see, no notice.
    for done in (x, y):
        assert await olga.error("alert.status", alert_id=done["alert_id"]) == "not_found"
        assert await olga.error("alert.trail", alert_id=done["alert_id"]) == "not_found"
        assert await olga.error("alert.received", alert_id=done["alert_id"]) == "not_found"
        assert await olga.error("subscribe", channel=f"alert:{done['alert_id']}") == "forbidden"
        again = await olga.ok("checkin.done", checkin_id=done["checkin_id"], pin=PIN)
        assert same(again) == same(x_done)
    z = await olga.ok("checkin.start", duration_s=1, location=HERE)  # sentinel
    await olga.nothing_before({"push": "checkin.missed", "checkin_id": z["checkin_id"]}, 10)
    mod = await Raw.open(alert_node.url, token("mia", roles=["user", "moderator"]))
    seen = await mod.ok("alert.status", alert_id=y["alert_id"])
    assert seen["duress"] is True and seen["checkin_id"] == y["checkin_id"]

    # checkin.extend with the duress PIN: looks moved, the alarm goes out now.
    w = await olga.ok("checkin.start", duration_s=600, location=HERE)
    moved = await olga.ok("checkin.extend", checkin_id=w["checkin_id"], duration_s=900, pin=DURESS)
    assert moved["state"] == "running" and moved["expires_at"] > w["expires_at"]
    started = time.time() * 1000
    await until(lambda: len(_sent_at(fakes, phone)) == 3, 10, what="the extended one's SMS")
    assert _sent_at(fakes, phone)[2] < started + 10_000
    await olga.ok("checkin.location", checkin_id=w["checkin_id"], location=NEARBY)
    trail = await bob.ok("alert.trail", alert_id=w["alert_id"])  # the alert follows the phone
    assert [p["lat"] for p in trail["points"]] == [HERE["lat"], NEARBY["lat"]]
    later = await olga.ok("checkin.done", checkin_id=w["checkin_id"], pin=PIN)
    assert same(later) == same(x_done)
