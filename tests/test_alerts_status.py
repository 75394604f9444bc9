"""Every status is true (issue 21): what `alert.status` says of each recipient is something the
server can prove. Real server processes, the real firebase-admin and twilio SDKs talking to the
fake providers, Twilio status callbacks signed with the SDK's own `RequestValidator`."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from conftest import Node, RedisServer, base_env, token, unique_db
from twilio.request_validator import RequestValidator
from wire import Raw, until

from realtime_safety.loadtests.fakeproviders import TWILIO_TOKEN, FakeProviders

HERE = {"lat": 52.5200, "lon": 13.4050, "accuracy_m": 12.0}
FALLBACK_S = 2.0  # RT_ALERT_FALLBACK_S of the nodes below


def start_node(tmp_path: Path, fakes: FakeProviders | None, name: str, **env: str) -> Node:
    """A node whose alerts go to `fakes` (none: the development outbox), with fast retries,
    status callbacks to itself and a short fallback."""
    providers = fakes.env(tmp_path) if fakes is not None else {}
    node = Node(
        base_env(
            tmp_path / name,
            RT_ALERT_RETRY_BASE_S="0.05",
            RT_ALERT_FALLBACK_S=str(FALLBACK_S),
            **providers,
            **env,
        ),
        name,
    )
    node.env["RT_PUBLIC_URL"] = node.http
    return node.start()


def people(*names: str) -> dict[str, str]:
    return {n: f"{n}-{uuid.uuid4().hex[:5]}" for n in names}


def put_contacts(node: Node, owner: str, contacts: list[dict[str, Any]]) -> None:
    r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": contacts})
    assert r.status_code == 200, r.text


def put_token(node: Node, user: str, tok: str) -> None:
    r = node.api("PUT", f"/v1/users/{user}/push-tokens/{tok}", json={"platform": "ios"})
    assert r.status_code == 201, r.text


async def subscribe(raw: Raw, channel: str) -> None:
    """Subscribe as an app does: an overloaded node answers `unavailable` with a
    `retry_after_ms` (chat work is shed first), and the app tries again."""
    deadline = time.monotonic() + 20
    while True:
        reply = await raw.cmd("subscribe", channel=channel)
        if reply["ok"]:
            return
        assert reply["error"]["code"] == "unavailable", reply
        assert time.monotonic() < deadline, reply
        await asyncio.sleep(reply["error"].get("retry_after_ms", 100) / 1000)


async def status_of(raw: Raw, alert_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    status = await raw.ok("alert.status", alert_id=alert_id)
    return {(r["route"], r["to"]): r for r in status["recipients"]}


async def settled(raw: Raw, alert_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The status once no recipient is `queued` any more."""

    async def check() -> dict[tuple[str, str], dict[str, Any]] | None:
        found = await status_of(raw, alert_id)
        return found if all(r["status"] != "queued" for r in found.values()) else None

    result: dict[tuple[str, str], dict[str, Any]] = await until(check, 20, what="the sends")
    return result


def sid_of(node: Node, alert_id: str, phone: str) -> str:
    """The Twilio message id the node stored for an SMS (its delivery record's index)."""
    db = sqlite3.connect(Path(node.env["RT_DATA_DIR"]) / "alerts.sqlite3")
    try:
        row = db.execute(
            "SELECT ix FROM docs WHERE coll='deliveries' AND key=?", (f"{alert_id}|sms|{phone}",)
        ).fetchone()
    finally:
        db.close()
    assert row is not None and row[0], f"no message id stored for {phone}"
    return str(row[0])


async def callback(
    node: Node, params: dict[str, str], *, signature: str | None = None
) -> httpx.Response:
    """POST a Twilio status callback, signed as Twilio signs it (unless `signature`)."""
    url = f"{node.http}/v1/twilio/status"
    if signature is None:
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, params)
    return await asyncio.to_thread(
        httpx.post, url, data=params, headers={"X-Twilio-Signature": signature}, timeout=10
    )


# --- WebSocket and push: `delivered` only on the app's receipt ----------------------------


async def test_ws_and_push_are_delivered_only_when_the_app_says_so(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = start_node(tmp_path, fakes, "receipts")
    try:
        p = people("olga", "bob", "carl", "dan", "eve")
        put_contacts(node, p["olga"], [{"user": p["bob"]}, {"user": p["carl"]}, {"user": p["dan"]}])
        put_token(node, p["carl"], f"tok-{p['carl']}")
        bob = await Raw.open(node.url, token(p["bob"]))
        await subscribe(bob, f"user:{p['bob']}")
        carl = await Raw.open(node.url, token(p["carl"]))  # online, not subscribed to user:carl
        eve = await Raw.open(node.url, token(p["eve"]))
        olga = await Raw.open(node.url, token(p["olga"]))
        # dan is not connected at all
        alert_id = (
            await olga.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="r1")
        )["alert_id"]
        assert (await bob.push(5))["alert_id"] == alert_id
        await until(lambda: fakes.fcm_to(f"tok-{p['carl']}"), what="the FCM request")

        by = await settled(olga, alert_id)
        assert by[("ws", p["bob"])]["status"] == "sent"
        assert by[("ws", p["carl"])]["status"] == "sent"  # connected: receipt unknown
        assert by[("ws", p["dan"])]["status"] == "offline"  # nobody could have it
        assert by[("push", p["carl"])]["status"] == "sent"  # FCM accepted it
        assert by[("push", p["dan"])]["status"] == "failed"  # no push token
        assert not [r for r in by.values() if r["status"] == "delivered"]

        # the receipts: bob by the WebSocket push, carl by the FCM notification
        assert (await bob.ok("alert.received", alert_id=alert_id))["route"] == "ws"
        await carl.ok("alert.received", alert_id=alert_id, route="push")
        assert await eve.error("alert.received", alert_id=alert_id) == "forbidden"
        assert await bob.error("alert.received", alert_id=alert_id, route="sms") == "bad_request"
        assert await bob.error("alert.received", alert_id="0" * 64) == "not_found"
        for bad in ("", "0" * 65, 7):
            assert await bob.error("alert.received", alert_id=bad) == "bad_request"
        by = await status_of(olga, alert_id)
        assert by[("ws", p["bob"])]["status"] == "delivered"
        assert by[("ws", p["bob"])]["received_at"] > 0
        assert by[("push", p["bob"])]["status"] == "failed"  # that route's own truth
        assert by[("push", p["carl"])]["status"] == "delivered"
        assert by[("ws", p["carl"])]["status"] == "sent"  # carl's socket never had it
        assert "received_at" not in by[("ws", p["carl"])]
        first = by[("ws", p["bob"])]["received_at"]
        await bob.ok("alert.received", alert_id=alert_id)  # idempotent, keeps the first time
        assert (await status_of(olga, alert_id))[("ws", p["bob"])]["received_at"] == first

        # a receipt is less than an ack, and an ack stays an ack
        await bob.ok("alert.ack", alert_id=alert_id)
        await bob.ok("alert.received", alert_id=alert_id)
        assert (await status_of(olga, alert_id))[("ws", p["bob"])]["status"] == "acked"
        assert node.metric("rt_alert_trigger_to_received_seconds_count", route="ws") == 1
        assert node.metric("rt_alert_trigger_to_received_seconds_count", route="push") == 1
        for raw in (bob, carl, eve, olga):
            await raw.close()
    finally:
        node.stop()


# --- SMS: Twilio's signed status callbacks -------------------------------------------------


async def test_sms_status_follows_signed_twilio_callbacks_only(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = start_node(tmp_path, fakes, "twilio")
    try:
        owner = f"tina-{uuid.uuid4().hex[:5]}"
        ok_phone, gone_phone, bad_phone = "+15557000001", "+15557000002", "+15557000003"
        put_contacts(
            node, owner, [{"phone": ok_phone}, {"phone": gone_phone}, {"phone": bad_phone}]
        )
        tina = await Raw.open(node.url, token(owner))
        alert_id = (
            await tina.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="t1")
        )["alert_id"]
        by = await settled(tina, alert_id)
        assert {by[("sms", n)]["status"] for n in (ok_phone, gone_phone, bad_phone)} == {"sent"}
        sid = sid_of(node, alert_id, ok_phone)
        delivered = {"MessageSid": sid, "MessageStatus": "delivered"}

        # forged: refused, and nothing changes
        assert (await callback(node, delivered, signature="forged")).status_code == 403
        other = RequestValidator("another-token").compute_signature(
            f"{node.http}/v1/twilio/status", delivered
        )
        assert (await callback(node, delivered, signature=other)).status_code == 403
        signed_for_sent = RequestValidator(TWILIO_TOKEN).compute_signature(
            f"{node.http}/v1/twilio/status", {**delivered, "MessageStatus": "sent"}
        )
        assert (await callback(node, delivered, signature=signed_for_sent)).status_code == 403
        assert (await status_of(tina, alert_id))[("sms", ok_phone)]["status"] == "sent"

        # signed: Twilio's own `sent` (and `queued`, `sending`) leave it sent; then delivered,
        # and a late `sent` does not take that back
        for early in ("queued", "sending", "sent"):
            r = await callback(node, {"MessageSid": sid, "MessageStatus": early})
            assert r.status_code == 204
        assert (await status_of(tina, alert_id))[("sms", ok_phone)]["status"] == "sent"
        assert (await callback(node, delivered)).status_code == 204
        assert (await status_of(tina, alert_id))[("sms", ok_phone)]["status"] == "delivered"
        late = {"MessageSid": sid, "MessageStatus": "sent"}
        assert (await callback(node, late)).status_code == 204
        assert (await status_of(tina, alert_id))[("sms", ok_phone)]["status"] == "delivered"

        gone = {
            "MessageSid": sid_of(node, alert_id, gone_phone),
            "MessageStatus": "undelivered",
            "ErrorCode": "30003",
        }
        bad = {"MessageSid": sid_of(node, alert_id, bad_phone), "MessageStatus": "failed"}
        for params in (gone, bad):
            assert (await callback(node, params)).status_code == 204
        by = await status_of(tina, alert_id)
        assert by[("sms", gone_phone)]["status"] == "undelivered"
        assert "30003" in by[("sms", gone_phone)]["error"]
        assert by[("sms", bad_phone)]["status"] == "failed"
        assert by[("sms", ok_phone)]["error"] is None
        await tina.close()
    finally:
        node.stop()


async def test_a_status_callback_before_the_send_is_recorded_is_not_lost(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """Twilio may call back before the worker has written the message id: the callback is
    kept, and applied when the id is written."""
    node = start_node(tmp_path, fakes, "early")
    try:
        owner, phone = f"ivy-{uuid.uuid4().hex[:5]}", "+15557000011"
        put_contacts(node, owner, [{"phone": phone}])
        fakes.script.twilio_hang.set()  # the SMS request is held unanswered
        ivy = await Raw.open(node.url, token(owner))
        alert_id = (await ivy.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="e1"))[
            "alert_id"
        ]
        await until(lambda: fakes.sms_to(phone), what="the SMS request")
        # The fake numbers its answers; nothing else asks it anything in this test.
        sid = f"SM{fakes._count + 1:032d}"
        r = await callback(node, {"MessageSid": sid, "MessageStatus": "delivered"})
        assert r.status_code == 204
        assert (await status_of(ivy, alert_id))[("sms", phone)]["status"] == "queued"
        fakes.script.twilio_hang.clear()

        async def delivered() -> bool:
            status: str = (await status_of(ivy, alert_id))[("sms", phone)]["status"]
            return status == "delivered"

        await until(delivered, 20, what="the early callback applied")
        assert sid_of(node, alert_id, phone) == sid
        await ivy.close()
    finally:
        node.stop()


# --- no credentials: `outbox`, and what to set ---------------------------------------------


async def test_without_credentials_the_status_is_outbox_and_the_log_says_what_to_set(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path, None, "outbox")
    try:
        p = people("otto", "pia")
        phone = "+15557000021"
        put_contacts(node, p["otto"], [{"user": p["pia"]}, {"phone": phone}])
        put_token(node, p["pia"], f"tok-{p['pia']}")
        otto = await Raw.open(node.url, token(p["otto"]))
        alert_id = (
            await otto.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="o1")
        )["alert_id"]
        by = await settled(otto, alert_id)
        assert by[("sms", phone)]["status"] == "outbox"
        assert by[("push", p["pia"])]["status"] == "outbox"
        log = node.log()
        assert "SMS are written to the outbox" in log
        assert "set RT_TWILIO_ACCOUNT_SID, RT_TWILIO_AUTH_TOKEN and RT_TWILIO_FROM" in log
        assert "set RT_FCM_CREDENTIALS" in log
        assert node.metric("rt_alert_deliveries_total", route="sms", outcome="outbox") == 1
        assert node.metric("rt_alert_deliveries_total", route="sms", outcome="sent") is None
        await otto.close()
    finally:
        node.stop()


# --- critical delivery ---------------------------------------------------------------------


async def test_push_is_high_priority_on_android_and_a_time_sensitive_alert_on_ios(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = start_node(tmp_path, fakes, "apns")
    try:
        p = people("nina", "omar")
        put_contacts(node, p["nina"], [{"user": p["omar"]}])
        put_token(node, p["omar"], f"tok-{p['omar']}")
        nina = await Raw.open(node.url, token(p["nina"]))
        alert_id = (
            await nina.ok("alert.trigger", kind="medical", location=HERE, client_alert_id="a1")
        )["alert_id"]
        [message] = await until(lambda: fakes.fcm_to(f"tok-{p['omar']}"), what="the push")
        assert message["android"]["priority"] == "high"
        assert message["data"]["alert_id"] == alert_id
        apns = message["apns"]
        assert apns["headers"]["apns-priority"] == "10"
        assert apns["headers"]["apns-push-type"] == "alert"
        assert apns["headers"]["apns-collapse-id"] == f"alert-{alert_id}"
        aps = apns["payload"]["aps"]
        assert aps["interruption-level"] == "time-sensitive"
        assert aps["sound"] == "default" and aps["mutable-content"] == 1
        assert p["nina"] in aps["alert"]["body"] and "52.52" not in aps["alert"]["body"]
        await nina.close()
    finally:
        node.stop()


async def test_a_critical_notice_carries_the_critical_sound(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """The provider itself (in this process), through the real SDK to the fake FCM."""
    from realtime_safety.alerts.delivery import DeliverySettings
    from realtime_safety.alerts.providers import FcmPush, Notice

    with pytest.raises(ValueError):
        DeliverySettings(apns_level="loud")
    push = FcmPush(str(fakes.service_account(tmp_path)), fakes.url)
    try:
        [result] = await push.send(
            ["tok-critical"],
            {"type": "alert"},
            collapse_key="alert-x",
            ttl_s=60,
            notice=Notice("Emergency alert", "ana needs help (sos)", "critical"),
        )
    finally:
        await push.close()
    assert result.ok
    [message] = fakes.fcm_to("tok-critical")
    aps = message["apns"]["payload"]["aps"]
    assert aps["interruption-level"] == "critical"
    assert aps["sound"] == {"critical": 1, "name": "default", "volume": 1.0}
    assert message["android"]["priority"] == "high"


async def test_the_resolved_notice_has_its_own_status_and_reason(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """The "resolved" SMS to a number the provider now refuses: its own status and reason
    show (`resolve`, `resolve_error`), and the alert notice's `sent` stands; the other
    number's resolve notice is `sent` (the control)."""
    node = start_node(tmp_path, fakes, "resolved")
    try:
        owner = f"rae-{uuid.uuid4().hex[:5]}"
        ok_phone, gone_phone = "+15557100001", "+15557100002"
        put_contacts(node, owner, [{"phone": ok_phone}, {"phone": gone_phone}])
        rae = await Raw.open(node.url, token(owner))
        alert_id = (await rae.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="r1"))[
            "alert_id"
        ]
        by = await settled(rae, alert_id)
        assert {by[("sms", n)]["status"] for n in (ok_phone, gone_phone)} == {"sent"}
        assert "resolve" not in by[("sms", ok_phone)]
        fakes.script.twilio_permanent.add(gone_phone)  # the number is gone since
        await rae.ok("alert.resolve", alert_id=alert_id, outcome="safe")

        async def resolved() -> dict[tuple[str, str], dict[str, Any]] | None:
            found = await status_of(rae, alert_id)
            done = all(found[("sms", n)].get("resolve") for n in (ok_phone, gone_phone))
            return found if done else None

        by = await until(resolved, 30, what="both resolve notices")
        assert by[("sms", ok_phone)]["resolve"] == "sent"
        gone = by[("sms", gone_phone)]
        assert gone["resolve"] == "failed" and "21211" in gone["resolve_error"], gone
        assert gone["status"] == "sent" and gone["attempts"] == 1  # the alert itself went out
        await rae.close()
    finally:
        node.stop()


# --- fallback across routes -------------------------------------------------------------------


async def test_a_contact_whose_app_does_not_confirm_gets_the_sms(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = start_node(tmp_path, fakes, "fallback")
    try:
        p = people("fay", "uma", "vic", "wes", "xan")
        phones = {n: f"+1555800{i:04d}" for i, n in enumerate(("uma", "vic", "wes", "xan"))}
        put_contacts(
            node,
            p["fay"],
            [
                {"user": p["uma"], "phone": phones["uma"]},  # not connected: needs the SMS
                {"user": p["vic"], "phone": phones["vic"]},  # her app confirms
                {"user": p["wes"], "phone": phones["wes"]},  # he acknowledges
                {"user": p["xan"]},  # no phone: nothing to fall back to
            ],
        )
        vic = await Raw.open(node.url, token(p["vic"]))
        await subscribe(vic, f"user:{p['vic']}")
        wes = await Raw.open(node.url, token(p["wes"]))
        await subscribe(wes, f"user:{p['wes']}")
        fay = await Raw.open(node.url, token(p["fay"]))
        started = time.time()
        alert_id = (await fay.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="f1"))[
            "alert_id"
        ]
        assert (await vic.push(5))["alert_id"] == alert_id
        await vic.ok("alert.received", alert_id=alert_id)
        assert (await wes.push(5))["alert_id"] == alert_id
        await wes.ok("alert.ack", alert_id=alert_id)

        # the settled fallbacks are the sentinel: uma's SMS, and the two that were not needed
        await until(
            lambda: (
                node.metric("rt_alert_fallbacks_total", outcome="not_needed") == 2
                and fakes.sms_to(phones["uma"])
            ),
            45,
            what="the fallbacks to settle",
        )
        [sms] = [r for r in fakes.sms if r.body["To"] == phones["uma"]]
        assert sms.at - started >= FALLBACK_S
        assert "EMERGENCY (sos)" in sms.body["Body"]
        assert not fakes.sms_to(phones["vic"]) and not fakes.sms_to(phones["wes"])
        assert not fakes.sms_to(phones["xan"])
        assert node.metric("rt_alert_fallbacks_total", outcome="sms") == 1

        async def texted() -> dict[str, Any] | None:
            record = (await status_of(fay, alert_id)).get(("sms", phones["uma"]))
            return record if record and record["status"] == "sent" else None

        record = await until(texted, 20, what="the fallback SMS in the status")
        # the durable records say what became of each fallback, and why
        db = sqlite3.connect(Path(node.env["RT_DATA_DIR"]) / "alerts.sqlite3")
        try:
            rows = db.execute(
                "SELECT key, doc FROM docs WHERE coll='alert_fallbacks' AND key LIKE ?",
                (f"{alert_id}|%",),
            ).fetchall()
        finally:
            db.close()
        settled = {key.split("|")[1]: msgpack.unpackb(doc)["state"] for key, doc in rows}
        assert settled == {p["uma"]: "sms", p["vic"]: "received", p["wes"]: "acked"}
        assert record["fallback_for"] == p["uma"] and record["attempts"] == 1
        by = await status_of(fay, alert_id)
        assert ("sms", phones["vic"]) not in by and ("sms", phones["wes"]) not in by
        assert by[("ws", p["uma"])]["status"] == "offline"
        for raw in (vic, wes, fay):
            await raw.close()
    finally:
        node.stop()


async def test_a_fallback_armed_before_the_node_died_still_goes_out(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = start_node(tmp_path, fakes, "phoenix")
    p = people("gil", "hal")
    phone = "+15558100001"
    put_contacts(node, p["gil"], [{"user": p["hal"], "phone": phone}])
    gil = await Raw.open(node.url, token(p["gil"]))
    alert_id = (await gil.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="p1"))[
        "alert_id"
    ]

    def armed() -> bool:
        db = sqlite3.connect(Path(node.env["RT_DATA_DIR"]) / "alerts.sqlite3")
        try:
            return bool(
                db.execute(
                    "SELECT 1 FROM docs WHERE coll='alert_fallbacks' AND key LIKE ?",
                    (f"{alert_id}|%",),
                ).fetchone()
            )
        finally:
            db.close()

    await until(armed, 20, what="the fallback to be armed")
    assert not fakes.sms_to(phone)
    node.kill()
    node.wait()
    await gil.close()
    node.start()  # the same data directory: the same store
    try:
        await until(lambda: fakes.sms_to(phone), 45, what="the SMS after the restart")
        gil = await Raw.open(node.url, token(p["gil"]))
        record = (await status_of(gil, alert_id))[("sms", phone)]
        assert record["fallback_for"] == p["hal"]
        assert len(fakes.sms_to(phone)) == 1
        await gil.close()
    finally:
        node.stop()


async def test_a_tier_with_its_own_fallback_delay_gets_the_sms_after_it(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """RT_ALERT_FALLBACK_S=3600,1:1: an hour for every tier but tier 1, whose contacts are
    texted after a second (with the tier's delay ignored, the SMS would wait an hour)."""
    node = Node(
        base_env(
            tmp_path / "tiers",
            **{**fakes.env(tmp_path), "RT_ALERT_RETRY_BASE_S": "0.05"},
            RT_ALERT_FALLBACK_S="3600,1:1",
        ),
        "tiers",
    ).start()
    try:
        p = people("ida", "jon")
        phone = "+15558300001"
        put_contacts(node, p["ida"], [{"tier": 1, "user": p["jon"], "phone": phone}])
        ida = await Raw.open(node.url, token(p["ida"]))
        started = time.time()
        alert_id = (await ida.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="t"))[
            "alert_id"
        ]
        await until(lambda: fakes.sms_to(phone), 30, what="tier 1's fallback SMS")
        [sms] = [r for r in fakes.sms if r.body["To"] == phone]
        assert sms.at - started >= 1.0
        record = (await status_of(ida, alert_id))[("sms", phone)]
        assert record["fallback_for"] == p["jon"]
        await ida.close()
    finally:
        node.stop()


async def test_a_contact_may_have_an_app_and_a_phone(tmp_path: Path) -> None:
    node = start_node(tmp_path, None, "contacts")
    try:
        owner = f"kim-{uuid.uuid4().hex[:5]}"
        contacts = [{"tier": 1, "user": "lea", "phone": "+15558200001"}, {"tier": 2, "user": "max"}]
        put_contacts(node, owner, contacts)
        assert node.api("GET", f"/v1/users/{owner}/contacts").json()["contacts"] == contacts
        for bad in ({"user": "lea", "phone": "555"}, {"user": "", "phone": "+15558200001"}, {}):
            r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": [bad]})
            assert r.status_code == 400, (bad, r.text)
    finally:
        node.stop()


# --- readiness and the queues' backlog ---------------------------------------------------------


async def test_queue_lag_and_the_oldest_unsent_delivery_are_measured(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = start_node(tmp_path, fakes, "lag")
    try:
        owner, phone = f"lou-{uuid.uuid4().hex[:5]}", "+15558300001"
        put_contacts(node, owner, [{"phone": phone}])
        assert node.metric("rt_alert_queue_up", route="sms") == 1
        fakes.script.twilio_hang.set()  # the SMS waits in the worker's hands
        lou = await Raw.open(node.url, token(owner))
        started = time.time()
        await lou.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="l1")

        def behind() -> tuple[float, float] | None:
            lag = node.metric("rt_alert_queue_lag_seconds", route="sms") or 0
            oldest = node.metric("rt_alert_oldest_unsent_seconds", route="sms") or 0
            return (lag, oldest) if lag >= 1 and oldest >= 1 else None

        lag, oldest = await until(behind, 20, what="the SMS queue to show its lag")
        assert lag <= oldest <= time.time() - started + 0.5  # seconds, as old as the SMS
        assert node.metric("rt_alert_queue_jobs", route="sms") == 1
        assert node.metric("rt_alert_queue_lag_seconds", route="ws") == 0
        assert node.metric("rt_alert_queue_jobs", route="ws") == 0
        fakes.script.twilio_hang.clear()
        await until(
            lambda: (
                node.metric("rt_alert_queue_lag_seconds", route="sms") == 0
                and node.metric("rt_alert_oldest_unsent_seconds", route="sms") == 0
                and node.metric("rt_alert_queue_jobs", route="sms") == 0
            ),
            30,
            what="the SMS queue to drain",
        )
        await lou.close()
    finally:
        node.stop()


async def readyz(node: Node) -> httpx.Response:
    return await asyncio.to_thread(httpx.get, node.http + "/readyz", timeout=10)


async def ready(node: Node) -> bool:
    return (await readyz(node)).status_code == 200


async def test_not_ready_while_alerts_cannot_be_queued(
    tmp_path: Path, fakes: FakeProviders, redis_server: RedisServer, mongo_uri: str
) -> None:
    node = start_node(
        tmp_path,
        fakes,
        "ready",
        RT_REDIS_URL=redis_server.url,
        RT_MONGODB_URI=mongo_uri,
        RT_MONGODB_DB=unique_db(),
    )
    try:
        r = await readyz(node)
        assert r.status_code == 200 and r.json()["alert_queue"] is True, r.text
        redis_server.stop()
        r = await readyz(node)
        assert r.status_code == 503 and r.json()["alert_queue"] is False, r.text
        await until(
            lambda: node.metric("rt_alert_queue_up", route="sms") == 0, 20, what="queue down"
        )
        redis_server.start()  # same port, empty: the queues recreate their streams
        await until(lambda: ready(node), 30, what="ready again")
        owner, phone = f"moe-{uuid.uuid4().hex[:5]}", "+15558400001"
        put_contacts(node, owner, [{"phone": phone}])
        moe = await Raw.open(node.url, token(owner))
        await moe.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="m1")
        await until(lambda: fakes.sms_to(phone), 30, what="an SMS after the restart")
        await moe.close()
    finally:
        node.stop()


# --- zero recipients ---------------------------------------------------------------------------


async def test_an_alert_with_no_recipients_says_so(tmp_path: Path, fakes: FakeProviders) -> None:
    node = start_node(tmp_path, fakes, "nobody")
    try:
        p = people("ned", "ann", "bea")
        put_contacts(node, p["ann"], [{"user": p["bea"]}])
        ned = await Raw.open(node.url, token(p["ned"]))  # no contacts, no responders near
        mod = await Raw.open(node.url, token("mod-" + p["ned"], roles=["user", "moderator"]))
        reply = await ned.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="z")
        assert reply["warnings"] == ["no_recipients"]
        alert_id = reply["alert_id"]
        again = await ned.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="z")
        assert again["alert_id"] == alert_id and again["warnings"] == ["no_recipients"]
        status = await ned.ok("alert.status", alert_id=alert_id)
        assert status["state"] == "active"  # the alert exists, for moderators to act on
        assert status["recipients"] == [] and status["warnings"] == ["no_recipients"]
        listed = {a["alert_id"]: a for a in (await mod.ok("mod.alerts"))["alerts"]}
        assert listed[alert_id]["warnings"] == ["no_recipients"]

        # an alert that notifies someone carries no warning
        ann = await Raw.open(node.url, token(p["ann"]))
        reply = await ann.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="y")
        assert "warnings" not in reply
        assert (await ann.ok("alert.status", alert_id=reply["alert_id"]))["warnings"] == []
        listed = {a["alert_id"]: a for a in (await mod.ok("mod.alerts"))["alerts"]}
        assert listed[reply["alert_id"]]["warnings"] == []
        for raw in (ned, mod, ann):
            await raw.close()
    finally:
        node.stop()
