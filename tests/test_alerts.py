"""Safety alerts (docs/protocol-v1.md section 7) end to end: real server processes, and the real
firebase-admin and twilio SDKs talking to local fake servers that record every request."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
from conftest import Node, base_env, token
from wire import Raw, until

from realtime_safety.loadtests.fakeproviders import TWILIO_TOKEN, FakeProviders

HERE = {"lat": 52.5200, "lon": 13.4050, "accuracy_m": 12.0}
NEARBY = {"lat": 52.5210, "lon": 13.4060}  # ~130 m away
FAR = {"lat": 48.1351, "lon": 11.5820}  # Munich


def setup_people(node: Node, owner: str, phone: str) -> dict[str, str]:
    names = {k: f"{k}-{uuid.uuid4().hex[:5]}" for k in ("bob", "carl", "rita", "fred", "dora")}
    r = node.api(
        "PUT",
        f"/v1/users/{owner}/contacts",
        json={
            "contacts": [
                {"tier": 1, "user": names["bob"]},
                {"tier": 1, "user": names["carl"]},
                {"tier": 1, "phone": phone},
                {"tier": 2, "user": names["dora"]},
            ]
        },
    )
    assert r.status_code == 200, r.text
    r = node.api(
        "PUT",
        f"/v1/users/{names['carl']}/push-tokens/tok-{names['carl']}",
        json={"platform": "android"},
    )
    assert r.status_code == 201
    return names


async def test_an_alert_reaches_every_route_once_and_nobody_else(
    alert_node: Node, fakes: FakeProviders
) -> None:
    owner, phone = f"olga-{uuid.uuid4().hex[:5]}", "+15551230001"
    n = setup_people(alert_node, owner, phone)
    bob = await Raw.open(alert_node.url, token(n["bob"]))
    await bob.ok("subscribe", channel=f"user:{n['bob']}")
    rita = await Raw.open(alert_node.url, token(n["rita"], roles=["user", "responder"]))
    await rita.ok("subscribe", channel=f"user:{n['rita']}")
    await rita.ok("location.share", location=NEARBY)
    fred = await Raw.open(alert_node.url, token(n["fred"], roles=["user", "responder"]))
    await fred.ok("subscribe", channel=f"user:{n['fred']}")
    await fred.ok("location.share", location=FAR)
    assert await fred.error("location.share", location={"lat": 91, "lon": 0}) == "bad_request"
    mod = await Raw.open(alert_node.url, token("mia", roles=["user", "moderator"]))
    stranger = await Raw.open(alert_node.url, token("eve"))
    await stranger.ok("subscribe", channel="user:eve")  # where an alert to eve would come
    olga = await Raw.open(alert_node.url, token(owner))
    await olga.ok("subscribe", channel=f"user:{owner}")
    assert await bob.error("location.share", location=HERE) == "forbidden"  # not a responder

    reply = await olga.ok(
        "alert.trigger", kind="sos", location=HERE, note="help", client_alert_id="press-1"
    )
    alert_id, channel = reply["alert_id"], reply["channel"]
    assert channel == f"alert:{alert_id}"
    again = await olga.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="press-1")
    assert again["alert_id"] == alert_id  # idempotent

    for who, raw in (("bob", bob), ("rita", rita), ("mia", mod)):
        push = await raw.push(5)
        assert push["push"] == "alert" and push["alert_id"] == alert_id, who
        assert push["location"]["lat"] == HERE["lat"] and push["user"] == owner
        assert push["kind"] == "sos" and push["note"] == "help" and push["state"] == "active"
    # fred (too far away) and the stranger get nothing: proved by a sentinel at the end

    await until(lambda: fakes.sms_to(phone) and fakes.fcm_to(f"tok-{n['carl']}"))
    sms = fakes.sms_to(phone)
    assert len(sms) == 1 and "52.520000,13.405000" in sms[0]["Body"]
    assert sms[0]["StatusCallback"] == f"{alert_node.http}/v1/twilio/status"
    fcm = fakes.fcm_to(f"tok-{n['carl']}")
    assert len(fcm) == 1
    assert fcm[0]["data"]["alert_id"] == alert_id and fcm[0]["android"]["priority"] == "high"
    assert fcm[0]["android"]["collapse_key"] == f"alert-{alert_id}"
    assert fakes.token_requests  # the real SDK fetched an OAuth token from our fake

    # location is visible only to the entitled
    assert await stranger.error("subscribe", channel=channel) == "forbidden"
    assert await stranger.error("alert.status", alert_id=alert_id) == "forbidden"
    await bob.ok("subscribe", channel=channel)
    await olga.ok("alert.location", alert_id=alert_id, location=NEARBY)
    trail = await bob.push(5)
    assert trail == {
        "push": "alert.location",
        "alert_id": alert_id,
        "location": {**NEARBY, "ts": trail["location"]["ts"]},
    }
    assert await bob.error("alert.location", alert_id=alert_id, location=HERE) == "forbidden"

    # ack goes to the owner; status shows every route
    await bob.ok("alert.ack", alert_id=alert_id)
    assert (await olga.push(5)) == {"push": "alert.ack", "alert_id": alert_id, "user": n["bob"]}
    assert await stranger.error("alert.ack", alert_id=alert_id) == "forbidden"
    status = await olga.ok("alert.status", alert_id=alert_id)
    routes = {(r["route"], r["to"]): r["status"] for r in status["recipients"]}
    assert routes[("ws", n["bob"])] == "acked"
    assert routes[("push", n["carl"])] == "sent"
    assert routes[("sms", phone)] == "sent"
    assert routes[("ws", n["rita"])] == "sent"  # `delivered` only on her app's alert.received
    attempts = {(r["route"], r["to"]): r["attempts"] for r in status["recipients"]}
    assert attempts[("sms", phone)] == attempts[("push", n["carl"])] == 1  # each sent once
    assert ("ws", n["fred"]) not in routes and ("ws", n["dora"]) not in routes  # tier 2 waits
    assert all(r["attempts"] >= 1 or r["route"] == "ws" for r in status["recipients"])

    # Twilio's status callback: signed requests update the status; forged ones are refused
    from twilio.request_validator import RequestValidator

    sid = next(iter(await _sids(alert_node, alert_id)))
    params = {"MessageSid": sid, "MessageStatus": "delivered"}
    url = f"{alert_node.http}/v1/twilio/status"
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, params)
    bad = await asyncio.to_thread(
        httpx.post, url, data=params, headers={"X-Twilio-Signature": "forged"}
    )
    assert bad.status_code == 403
    ok = await asyncio.to_thread(
        httpx.post, url, data=params, headers={"X-Twilio-Signature": signature}
    )
    assert ok.status_code == 204
    status = await olga.ok("alert.status", alert_id=alert_id)
    assert {(r["route"], r["status"]) for r in status["recipients"]} >= {("sms", "delivered")}

    # resolve: everyone alerted is told, on every route they were alerted through
    assert await bob.error("alert.resolve", alert_id=alert_id, outcome="safe") == "forbidden"
    await olga.ok("alert.resolve", alert_id=alert_id, outcome="safe")
    seen = [await bob.push(5) for _ in range(3)]  # on alert:<id> and on user:<bob>
    assert [p["push"] for p in seen].count("alert.resolved") == 2
    assert {p["push"] for p in seen} == {"alert.ack", "alert.resolved"}  # ack echoed there
    await until(
        lambda: len(fakes.sms_to(phone)) == 2 and len(fakes.fcm_to(f"tok-{n['carl']}")) == 2
    )
    assert ["resolved" in m["Body"] for m in fakes.sms_to(phone)] == [False, True]
    assert [m["data"]["type"] for m in fakes.fcm_to(f"tok-{n['carl']}")][1] == "alert.resolved"
    assert (await olga.ok("alert.status", alert_id=alert_id))["state"] == "resolved"
    # Sentinels: a server message on each one's own channel is the first push they get, so
    # no alert, location, ack or resolve push reached fred or the stranger before it.
    for who, raw in ((n["fred"], fred), ("eve", stranger)):
        r = alert_node.api(
            "POST",
            f"/v1/channels/user:{who}/messages",
            json={"client_msg_id": "sentinel", "body": {"v": 1, "alg": "none", "text": "s"}},
        )
        assert r.status_code == 201, r.text
        await raw.nothing_before({"push": "message", "channel": f"user:{who}"})
    for r in (bob, rita, fred, mod, stranger, olga):
        await r.close()


async def _sids(node: Node, alert_id: str) -> set[str]:
    import sqlite3

    db = sqlite3.connect(Path(node.env["RT_DATA_DIR"]) / "alerts.sqlite3")
    rows = db.execute(
        "SELECT ix FROM docs WHERE coll='deliveries' AND key LIKE ?", (f"{alert_id}|sms|%",)
    ).fetchall()
    db.close()
    return {r[0] for r in rows if r[0]}


async def test_provider_failures_retry_then_settle(alert_node: Node, fakes: FakeProviders) -> None:
    owner = f"paula-{uuid.uuid4().hex[:5]}"
    flaky, dead = "+15551230002", "+15551230003"
    gone = f"gone-{uuid.uuid4().hex[:5]}"
    assert (
        alert_node.api(
            "PUT",
            f"/v1/users/{owner}/contacts",
            json={"contacts": [{"phone": flaky}, {"phone": dead}, {"user": gone}]},
        ).status_code
        == 200
    )
    alert_node.api("PUT", f"/v1/users/{gone}/push-tokens/stale-token", json={})
    fakes.script.twilio_fail = [500, 503]  # the first two SMS requests fail
    fakes.script.twilio_permanent = {dead}
    fakes.script.fcm_unregistered = {"stale-token"}
    paula = await Raw.open(alert_node.url, token(owner))
    alert_id = (
        await paula.ok("alert.trigger", kind="medical", location=HERE, client_alert_id="x")
    )["alert_id"]

    async def settled() -> dict[tuple[str, str], dict[str, Any]] | None:
        status = await paula.ok("alert.status", alert_id=alert_id)
        by = {(r["route"], r["to"]): r for r in status["recipients"]}
        done = all(r["status"] != "queued" for r in by.values())
        return by if done and by[("sms", flaky)]["status"] == "sent" else None

    by = await until(settled, 20)
    assert by[("sms", dead)]["status"] == "failed" and by[("sms", dead)]["attempts"] == 1
    assert by[("sms", flaky)]["attempts"] >= 2  # retried after the failures
    assert by[("push", gone)]["status"] == "failed"  # its only token was unregistered
    # the stale token was pruned
    r = alert_node.api("DELETE", f"/v1/users/{gone}/push-tokens/stale-token")
    assert r.status_code == 404
    assert len([s for s in fakes.sms if s.body["To"] == flaky]) >= 2
    await paula.close()


def test_fcm_endpoint_attribute_still_exists() -> None:
    """RT_FCM_ENDPOINT depends on this private attribute of the pinned firebase-admin."""
    from firebase_admin import messaging

    assert isinstance(messaging._MessagingService.FCM_URL, str)
    assert "{0}" in messaging._MessagingService.FCM_URL


async def test_validation_rate_limits_and_escalation(tmp_path: Path, fakes: FakeProviders) -> None:
    node = Node(
        base_env(
            tmp_path / "esc",
            RT_ALERT_ESCALATE_S="1",
            RT_ALERT_TRIGGER_LIMIT="2",
            **fakes.env(tmp_path),
        ),
        "escalation",
    )
    node.start()
    try:
        owner = f"ulla-{uuid.uuid4().hex[:5]}"
        first, second = f"first-{uuid.uuid4().hex[:4]}", f"second-{uuid.uuid4().hex[:4]}"
        node.api(
            "PUT",
            f"/v1/users/{owner}/contacts",
            json={"contacts": [{"tier": 1, "user": first}, {"tier": 2, "user": second}]},
        )
        a = await Raw.open(node.url, token(first))
        await a.ok("subscribe", channel=f"user:{first}")
        b = await Raw.open(node.url, token(second))
        await b.ok("subscribe", channel=f"user:{second}")
        ulla = await Raw.open(node.url, token(owner))
        for bad in (
            {"kind": "panic", "location": HERE},
            {"kind": "sos", "location": {"lat": 0, "lon": 181}},
            {"kind": "sos", "location": {"lat": 0, "lon": 0, "ts": 1}},
            {"kind": "sos", "location": HERE, "client_alert_id": ""},
        ):
            assert (
                await ulla.error("alert.trigger", **{"client_alert_id": "v", **bad})
                == "bad_request"
            )
        alert_id = (
            await ulla.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="e1")
        )["alert_id"]
        assert (await a.push(5))["alert_id"] == alert_id
        # no ack: after 1 s a resend to tier 1, then after another the next tier
        assert (await a.push(5))["alert_id"] == alert_id
        assert (await b.push(8))["alert_id"] == alert_id
        await b.ok("alert.ack", alert_id=alert_id)  # tier 2 is now entitled
        await ulla.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="e2")
        assert (
            await ulla.error("alert.trigger", kind="fire", location=HERE, client_alert_id="e3")
            == "rate_limited"
        )
        for r in (a, b, ulla):
            await r.close()
    finally:
        node.stop()


def test_contacts_api(alert_node: Node) -> None:
    r = alert_node.api("PUT", "/v1/users/zed/contacts", json={"contacts": [{"phone": "555"}]})
    assert r.status_code == 400
    r = httpx.put(f"{alert_node.http}/v1/users/zed/contacts", json={"contacts": []})
    assert r.status_code == 401
    r = alert_node.api(
        "PUT", "/v1/users/zed/contacts", json={"contacts": [{"tier": 2, "phone": "+4930123456"}]}
    )
    assert r.json()["contacts"] == [{"tier": 2, "phone": "+4930123456"}]
    assert alert_node.api("GET", "/v1/users/zed/contacts").json()["contacts"][0]["tier"] == 2
    assert httpx.get(f"{alert_node.http}/v1/users/zed/contacts").status_code == 401


async def test_cluster_alert_survives_a_worker_killed_mid_delivery(
    tmp_path: Path, fakes: FakeProviders, redis_server: Any, mongo_uri: str
) -> None:
    from conftest import unique_db

    env = {
        "RT_REDIS_URL": redis_server.url,
        "RT_MONGODB_URI": mongo_uri,
        "RT_MONGODB_DB": unique_db(),
        "RT_ALERT_LEASE_S": "2",
        "RT_ALERT_PROVIDER_TIMEOUT_S": "1",
        "RT_ALERT_TRIGGER_LIMIT": "2",
        "RT_STORE_TIMEOUT_S": "10",
        **fakes.env(tmp_path),
    }
    a = Node(base_env(tmp_path / "a", RT_NODE_ID="a", **env), "a")
    b = Node(base_env(tmp_path / "b", RT_NODE_ID="b", **env), "b")
    a.start()
    b.start()
    try:
        owner = f"vera-{uuid.uuid4().hex[:5]}"
        friend = f"wes-{uuid.uuid4().hex[:5]}"
        phones = [f"+1555123{i:04d}" for i in range(3)]
        a.api(
            "PUT",
            f"/v1/users/{owner}/contacts",
            json={"contacts": [{"user": friend}] + [{"phone": p} for p in phones]},
        )
        on_b = await Raw.open(b.url, token(friend))  # the contact is on the other node
        await on_b.ok("subscribe", channel=f"user:{friend}")
        fakes.script.twilio_delay_s = 1.5  # node a's worker is mid-request when it dies
        vera = await Raw.open(a.url, token(owner))
        alert_id = (
            await vera.ok("alert.trigger", kind="harassment", location=HERE, client_alert_id="k1")
        )["alert_id"]
        assert (await on_b.push(5))["alert_id"] == alert_id  # fanned out across nodes
        await until(lambda: len(fakes.sms) >= 1, 5)
        a.kill()  # SIGKILL with SMS jobs leased and in flight
        fakes.script.twilio_delay_s = 0
        viewer = await Raw.open(b.url, token(owner))

        async def all_sent() -> list[dict[str, Any]] | None:
            status = await viewer.ok("alert.status", alert_id=alert_id)
            sms = [r for r in status["recipients"] if r["route"] == "sms"]
            return sms if len(sms) == 3 and all(r["status"] == "sent" for r in sms) else None

        await until(all_sent, 30)  # node b reclaimed node a's jobs: nobody skipped
        for p in phones:
            # At least once; twice only inside the documented window (Twilio has no
            # idempotency key: a request in flight when its worker died is sent again).
            assert 1 <= len(fakes.sms_to(p)) <= 2
        # The trigger limit (2 per 10 minutes) is agreed by both nodes: the first alert was
        # on node a, the second on node b counts against it, the third is refused on either.
        await viewer.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="k2")
        assert (
            await viewer.error("alert.trigger", kind="sos", location=HERE, client_alert_id="k3")
            == "rate_limited"
        )
        await on_b.close()
        await viewer.close()
    finally:
        a.stop()
        b.stop()


def test_the_fake_twilio_also_serves_the_sync_client(fakes: FakeProviders) -> None:
    from twilio.rest import Client

    from realtime_safety.loadtests.fakeproviders import TWILIO_FROM, TWILIO_SID

    client = Client(TWILIO_SID, TWILIO_TOKEN)
    client.api.base_url = fakes.url
    message = client.messages.create(to="+15557654321", from_=TWILIO_FROM, body="hi")
    assert message.sid.startswith("SM") and fakes.sms_to("+15557654321")[0]["Body"] == "hi"


async def test_a_refused_trigger_stays_refused_on_retry(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """The limit is checked before anything is written: retrying a refused trigger with the
    same client_alert_id is refused again, never an ok for an alert that does not exist."""
    from realtime_safety.alerts.plan import alert_id_for

    node = Node(base_env(tmp_path / "q", RT_ALERT_TRIGGER_LIMIT="1", **fakes.env(tmp_path)), "q")
    node.start()
    try:
        owner = f"quinn-{uuid.uuid4().hex[:5]}"
        node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": "+15550009"}]})
        quinn = await Raw.open(node.url, token(owner))
        first = await quinn.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="A")
        assert first["alert_id"] == alert_id_for(owner, "A")
        for _ in range(2):  # the refusal, then the client's retry of it
            assert (
                await quinn.error("alert.trigger", kind="sos", location=HERE, client_alert_id="B")
                == "rate_limited"
            )
        assert await quinn.error("alert.status", alert_id=alert_id_for(owner, "B")) == "not_found"
        # The retry of the accepted one is still its ok (and not counted again).
        again = await quinn.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="A")
        assert again["alert_id"] == first["alert_id"] and again["channel"] == first["channel"]
        await until(lambda: fakes.sms_to("+15550009"))
        await quinn.close()
    finally:
        node.stop()


async def test_the_client_keeps_an_sos_until_the_server_promises_it(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """client.Client.trigger_alert against a node killed right after it stored the
    alert (before it could answer): the client reconnects to the restarted node, sends the
    same client_alert_id again and gets the same alert; its SMS goes out once."""
    from realtime_safety.alerts.plan import alert_id_for
    from realtime_safety.client import Client

    env = base_env(tmp_path / "k", RT_ALERT_RECONCILE_S="30", **fakes.env(tmp_path))
    node = Node(
        {**env, "RT_FAULT_KILL_AT": "trigger:stored"}, "k", "realtime_safety.loadtests.faults.node"
    )
    node.start()
    phone = "+15550777"
    try:
        node.api("PUT", "/v1/users/kim/contacts", json={"contacts": [{"phone": phone}]})
        async with Client(node.url, token("kim"), max_backoff_s=0.5) as kim:
            sos = asyncio.create_task(kim.trigger_alert("sos", HERE, client_alert_id="c1"))
            assert await asyncio.to_thread(node.wait, 10) != 0  # killed before it answered
            node.env = env
            node.start()  # the same port; the client's reconnect finds it
            reply = await asyncio.wait_for(sos, 30)
        assert reply["alert_id"] == alert_id_for("kim", "c1") and kim.reconnects >= 1
        await until(lambda: phone in fakes.accepted_sms)
        # Sentinel: resolving sends the phone a second SMS; the alert's own SMS went out once
        # before it (the alert's pending sends are cancelled by the resolve).
        kim_again = await Raw.open(node.url, token("kim"))
        await kim_again.ok("alert.resolve", alert_id=reply["alert_id"], outcome="safe")
        await until(lambda: len(fakes.sms_to(phone)) >= 2)
        assert fakes.accepted_sms.count(phone) == 2
        assert ["resolved" in m["Body"] for m in fakes.sms_to(phone)] == [False, True]
        await kim_again.close()
    finally:
        node.stop()
