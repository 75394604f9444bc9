"""The safety-alert promises (README "Safety alerts"), each pinned by a small end-to-end test:
real server processes (the fault suite's kill switch where a node must die at a step), and the
real firebase-admin and twilio SDKs talking to the local fake providers.

- a retry finishes what a trigger (or a resolve) cut short, without waiting for a reconciler;
- a resolve notice reaches whom the alert reached, even if the alert was still being sent, and
  every tier that an escalation reached; a finished alert stops being due;
- nobody is texted about an alert resolved before its SMS went out, and `alert.status` says
  `cancelled`;
- a hanging SMS provider is given up on after the provider timeout, and the status says so;
- a Redis restart while an SMS is in flight sends it once;
- `alert.status` lists the whole stored plan, even before any delivery record exists.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import redis
from conftest import Node, RedisServer, base_env, token, unique_db
from wire import Raw, until

from realtime_safety.alerts.plan import alert_id_for
from realtime_safety.loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.52, "lon": 13.405}


@contextlib.contextmanager
def running(
    tmp_path: Path, fakes: FakeProviders, module: str = "realtime_safety.realtime", **env: str
) -> Iterator[Node]:
    node = Node(
        base_env(tmp_path / "node", RT_ALERT_RETRY_BASE_S="0.05", **fakes.env(tmp_path), **env),
        "node",
        module,
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()


def contacts(node: Node, owner: str, *entries: dict[str, Any]) -> None:
    r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": list(entries)})
    assert r.status_code == 200, r.text


def texts(fakes: FakeProviders, phone: str) -> list[str]:
    """The bodies of the SMS the provider accepted for `phone`, in order (the failures these
    tests script are answered before any success, so they are the first requests)."""
    accepted = fakes.accepted_sms.count(phone)
    bodies = [b["Body"] for b in fakes.sms_to(phone)]
    return bodies[len(bodies) - accepted :] if accepted else []


def stored(node: Node, coll: str, key: str) -> tuple[Any, dict[str, Any]] | None:
    """(ix, document) of a record in the node's SQLite store."""
    db = sqlite3.connect(Path(node.env["RT_DATA_DIR"]) / "alerts.sqlite3")
    try:
        row = db.execute("SELECT ix, doc FROM docs WHERE coll=? AND key=?", (coll, key)).fetchone()
    finally:
        db.close()
    return None if row is None else (row[0], msgpack.unpackb(row[1], raw=False))


async def attempt(node: Node, user: str, op: str, **args: Any) -> None:
    """An op whose node dies before it answers."""
    with contextlib.suppress(Exception):
        raw = await Raw.open(node.url, token(user))
        await raw.cmd(op, timeout=5, **args)


async def status_of(raw: Raw, alert_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    reply = await raw.ok("alert.status", alert_id=alert_id)
    return {(r["route"], r["to"]): r for r in reply["recipients"]}


async def test_a_retry_finishes_a_trigger_and_a_resolve_that_were_cut_short(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """The node dies right after the commit point; the reconciler is far away (10 min), so
    only the client's retry can finish the job — and the retry is not counted twice."""
    owner, phone = f"olga-{uuid.uuid4().hex[:5]}", "+15551110001"
    trigger = {"kind": "sos", "location": HERE, "client_alert_id": "press"}
    with running(
        tmp_path,
        fakes,
        "realtime_safety.loadtests.faults.node",
        RT_ALERT_RECONCILE_S="600",
        RT_ALERT_TRIGGER_LIMIT="1",
        RT_FAULT_KILL_AT="trigger:stored",
    ) as node:
        contacts(node, owner, {"phone": phone})
        await attempt(node, owner, "alert.trigger", **trigger)
        node.wait()  # killed with the alert stored and nothing queued
        node.env["RT_FAULT_KILL_AT"] = "resolve:stored"
        node.start()
        olga = await Raw.open(node.url, token(owner))
        alert_id = (await olga.ok("alert.trigger", **trigger))["alert_id"]
        await until(lambda: len(texts(fakes, phone)) == 1)
        await attempt(node, owner, "alert.resolve", alert_id=alert_id, outcome="safe")
        node.wait()  # killed with the resolve stored and its notices not queued
        del node.env["RT_FAULT_KILL_AT"]
        node.start()
        olga = await Raw.open(node.url, token(owner))
        reply = await olga.ok("alert.resolve", alert_id=alert_id, outcome="safe")
        assert reply["state"] == "resolved"
        await until(lambda: len(texts(fakes, phone)) == 2)
        assert "resolved" in texts(fakes, phone)[1]
        await olga.close()


async def test_the_resolve_notice_follows_an_sms_that_was_still_being_sent(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    owner, phone = f"paul-{uuid.uuid4().hex[:5]}", "+15551110002"
    with running(tmp_path, fakes) as node:
        contacts(node, owner, {"phone": phone})
        fakes.script.twilio_delay_s = 1.0  # the provider takes its time to accept
        paul = await Raw.open(node.url, token(owner))
        trigger = {"kind": "sos", "location": HERE, "client_alert_id": "p"}
        alert_id = (await paul.ok("alert.trigger", **trigger))["alert_id"]
        await until(lambda: fakes.sms_to(phone))  # the alert SMS is in flight
        await paul.ok("alert.resolve", alert_id=alert_id, outcome="false_alarm")
        await until(lambda: len(texts(fakes, phone)) == 2)
        first, second = texts(fakes, phone)
        assert "EMERGENCY" in first and "resolved" in second
        await paul.close()


async def test_every_tier_an_escalation_reached_hears_the_resolve_once(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    owner, near, far = f"rosa-{uuid.uuid4().hex[:5]}", "+15551110003", "+15551110004"
    with running(tmp_path, fakes, RT_ALERT_ESCALATE_S="1", RT_ALERT_RECONCILE_S="1") as node:
        bad = "+15551110009"  # refused for good: dead-lettered, and never told of the resolve
        fakes.script.twilio_permanent = {bad}
        tier1 = [{"tier": 1, "phone": near}, {"tier": 1, "phone": bad}]
        contacts(node, owner, *tier1, {"tier": 2, "phone": far})
        rosa = await Raw.open(node.url, token(owner))
        trigger = {"kind": "fire", "location": HERE, "client_alert_id": "r"}
        alert_id = (await rosa.ok("alert.trigger", **trigger))["alert_id"]
        await until(lambda: texts(fakes, far))  # resent to tier 1, then tier 2 reached
        await rosa.ok("alert.resolve", alert_id=alert_id, outcome="handled")
        await until(lambda: any("resolved" in t for t in texts(fakes, far)))

        def settled() -> bool:  # its plan finished, a resolved alert is due for nothing
            found = stored(node, "alerts", alert_id)
            return found is not None and found[0] is None

        await until(settled)
        assert [t for t in texts(fakes, near) if "resolved" in t] == [texts(fakes, near)[-1]]
        assert len(texts(fakes, near)) == 3  # the alert, the resend, one resolve notice
        assert len(texts(fakes, far)) == 2  # the alert (escalation), one resolve notice
        assert (await status_of(rosa, alert_id))[("sms", bad)]["status"] == "failed"
        assert texts(fakes, bad) == []
        await rosa.close()


async def test_an_alert_resolved_before_its_sms_went_out_texts_nobody(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    owner, phone = f"sara-{uuid.uuid4().hex[:5]}", "+15551110005"
    with running(tmp_path, fakes) as node:
        contacts(node, owner, {"phone": phone})
        fakes.script.retry_after = "2"
        fakes.script.twilio_fail = [503]  # the first attempt fails: the SMS waits 2 s
        sara = await Raw.open(node.url, token(owner))
        trigger = {"kind": "sos", "location": HERE, "client_alert_id": "s"}
        alert_id = (await sara.ok("alert.trigger", **trigger))["alert_id"]

        async def failed_once() -> bool:
            return (await status_of(sara, alert_id))[("sms", phone)]["error"] is not None

        await until(failed_once)
        await sara.ok("alert.resolve", alert_id=alert_id, outcome="safe")

        def both_finished() -> bool:  # the alert SMS and its resolve notice, each for good
            found = stored(node, "deliveries", f"{alert_id}|sms|{phone}")
            done = (
                set()
                if found is None
                else {p for m in ("sent", "dead", "skipped") for p in found[1][m]}
            )
            return done >= {"alert", "resolve"}

        await until(both_finished)
        assert texts(fakes, phone) == []  # neither the alert nor a "resolved" for it
        assert (await status_of(sara, alert_id))[("sms", phone)]["status"] == "cancelled"
        await sara.close()


async def test_a_hanging_sms_provider_is_given_up_on_and_the_status_says_so(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    owner, friend, phone = f"tina-{uuid.uuid4().hex[:5]}", "ugo", "+15551110006"
    with running(tmp_path, fakes, RT_ALERT_PROVIDER_TIMEOUT_S="1", RT_ALERT_LEASE_S="2") as node:
        contacts(node, owner, {"phone": phone}, {"user": friend})
        node.api("PUT", f"/v1/users/{friend}/push-tokens/tok-ugo", json={})
        fakes.script.twilio_hang.set()
        tina = await Raw.open(node.url, token(owner))
        trigger = {"kind": "sos", "location": HERE, "client_alert_id": "t"}
        alert_id = (await tina.ok("alert.trigger", **trigger))["alert_id"]
        # planned, so listed at once (before any attempt has an outcome)
        assert (await status_of(tina, alert_id))[("sms", phone)]["status"] == "queued"
        await until(lambda: "tok-ugo" in fakes.accepted_push)  # push is not held up

        async def given_up() -> dict[str, Any] | None:
            sms = (await status_of(tina, alert_id))[("sms", phone)]
            return sms if sms["error"] and "no answer" in sms["error"] else None

        sms = await until(given_up)
        assert sms["status"] == "queued"  # it will be retried
        fakes.script.twilio_hang.clear()

        async def sent() -> bool:
            return (await status_of(tina, alert_id))[("sms", phone)]["status"] == "sent"

        await until(sent)
        assert texts(fakes, phone)
        await tina.close()


async def test_a_redis_restart_while_an_sms_is_in_flight_sends_it_once(
    tmp_path: Path, fakes: FakeProviders, redis_server: RedisServer, mongo_uri: str
) -> None:
    """Redis loses the job while its worker waits on the provider: the reconciler queues it
    again, and the worker, answered 503, gives it back too. The copy that runs second finds
    the SMS sent and sends nothing."""
    owner, phone = f"vera-{uuid.uuid4().hex[:5]}", "+15551110007"
    with running(
        tmp_path,
        fakes,
        RT_REDIS_URL=redis_server.url,
        RT_MONGODB_URI=mongo_uri,
        RT_MONGODB_DB=unique_db(),
        RT_ALERT_RECONCILE_S="1",
        RT_ALERT_PROVIDER_TIMEOUT_S="2",
        RT_ALERT_LEASE_S="4",
    ) as node:
        contacts(node, owner, {"phone": phone})
        fakes.script.twilio_delay_s = 1.5
        fakes.script.retry_after = "3"
        fakes.script.twilio_fail = [503]  # the request in flight when Redis restarts
        vera = await Raw.open(node.url, token(owner))
        trigger = {"kind": "sos", "location": HERE, "client_alert_id": "v"}
        alert_id = (await vera.ok("alert.trigger", **trigger))["alert_id"]
        await until(lambda: fakes.sms_to(phone))
        redis_server.stop()
        redis_server.start()  # empty

        async def sent() -> bool:
            return (await status_of(vera, alert_id))[("sms", phone)]["status"] == "sent"

        await until(sent, 20)
        r = redis.Redis(port=redis_server.port)
        stream, delayed = "{rt:alerts:sms}:jobs", "{rt:alerts:sms}:delayed"
        try:  # every copy of the job has run
            await until(lambda: r.zcard(delayed) == 0 and r.xlen(stream) == 0, 15)
        finally:
            r.close()
        assert len(fakes.sms_to(phone)) >= 2 and len(texts(fakes, phone)) == 1
        await vera.close()


async def test_the_status_of_a_stored_alert_lists_its_whole_plan(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """The node dies right after the commit point, before any delivery record exists: the
    status lists the planned SMS as queued all the same (found as a bug, fixed in 678a3e3)."""
    owner, phone = f"wanda-{uuid.uuid4().hex[:5]}", "+15551110008"
    trigger = {"kind": "sos", "location": HERE, "client_alert_id": "w"}
    with running(
        tmp_path,
        fakes,
        "realtime_safety.loadtests.faults.node",
        RT_ALERT_RECONCILE_S="600",
        RT_FAULT_KILL_AT="trigger:stored",
    ) as node:
        contacts(node, owner, {"phone": phone})
        await attempt(node, owner, "alert.trigger", **trigger)
        node.wait()  # killed with the alert and its plan stored, no delivery record yet
        del node.env["RT_FAULT_KILL_AT"]
        node.start()
        moderator = await Raw.open(node.url, token("mia", roles=["user", "moderator"]))
        alert_id = alert_id_for(owner, "w")
        status = await status_of(moderator, alert_id)
        await moderator.close()
        assert status.get(("sms", phone), {}).get("status") == "queued", status
