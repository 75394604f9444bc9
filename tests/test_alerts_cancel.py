"""The cancel window and the duress PIN (docs/protocol.md, "Cancel window, duress PIN") on real
server processes, with the fake providers reached through the real SDKs: a countdown holds the
plan (and outlives the node), the PIN cancels it, wrong PINs are refused and limited, and the
duress PIN answers exactly like the PIN while the alert goes out at once, flagged."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from conftest import Node, base_env, token
from wire import Raw, until

from realtime_safety.alerts.cancel import DURESS_NOTE
from realtime_safety.loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.52, "lon": 13.405}
NEARBY = {"lat": 52.521, "lon": 13.406}
PIN, DURESS = "2468", "1357"


def _node(tmp_path: Path, fakes: FakeProviders, name: str = "n", **env: str) -> Node:
    module = env.pop("module", "realtime")
    node = Node(
        base_env(
            tmp_path / name,
            RT_ALERT_RETRY_BASE_S="0.05",
            RT_ALERT_RECONCILE_S="1",
            **fakes.env(tmp_path),
            **env,
        ),
        name,
        module,
    )
    return node.start()


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


def _without(reply: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("id", *keys)}


async def test_a_countdown_holds_the_plan_and_outlives_its_node(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = _node(tmp_path, fakes)
    try:
        owner, phone, friend = _people(node)
        olga = await Raw.open(node.url, token(owner))
        await olga.ok("pin.set", pin=PIN)
        reply = await olga.ok(
            "alert.trigger", kind="sos", location=HERE, client_alert_id="c1", delay_s=3
        )
        assert reply["state"] == "countdown" and reply["channel"] == f"alert:{reply['alert_id']}"
        notify_at = reply["notify_at"]
        status = await olga.ok("alert.status", alert_id=reply["alert_id"])
        assert status["state"] == "countdown" and status["notify_at"] == notify_at
        assert {(r["route"], r["to"], r["status"]) for r in status["recipients"]} == {
            ("sms", phone, "held"),
            ("ws", friend, "held"),
            ("push", friend, "held"),
        }
        # A recipient cannot act on an alert that has not reached them.
        bob = await Raw.open(node.url, token(friend))
        assert await bob.error("alert.ack", alert_id=reply["alert_id"]) == "not_found"
        assert await bob.error("subscribe", channel=reply["channel"]) == "forbidden"
        await olga.close()
        await bob.close()
        # The node dies in the window (its own timer with it): whoever runs next sends it.
        node.kill()
        node.wait()
        node.start()
        await until(lambda: _sent_at(fakes, phone), 20, what="the SMS after the countdown")
        sent_at = _sent_at(fakes, phone)[0]
        assert sent_at >= notify_at  # never before the window ends
        # The latency is measured from the window's end: the owner's 3 s are not ours.
        measured = node.metric("rt_alert_trigger_to_provider_seconds_sum", route="sms")
        assert measured is not None and measured <= (sent_at - notify_at) / 1000 + 1
        olga = await Raw.open(node.url, token(owner))
        status = await olga.ok("alert.status", alert_id=reply["alert_id"])
        assert status["state"] == "active" and "notify_at" not in status
        # no PIN, no window: a countdown nobody could close would be a way to silence an SOS
        other = await Raw.open(node.url, token(f"nopin-{uuid.uuid4().hex[:5]}"))
        plain = await other.ok(
            "alert.trigger", kind="sos", location=HERE, client_alert_id="c2", delay_s=30
        )
        assert plain["state"] == "active" and "no_pin" in plain["warnings"]
        assert "notify_at" not in plain
        assert await other.error("alert.cancel", alert_id=plain["alert_id"], pin=PIN) == "conflict"
        for bad in (-1, 61, "5", True):
            assert (
                await olga.error(
                    "alert.trigger", kind="sos", location=HERE, client_alert_id="c3", delay_s=bad
                )
                == "bad_request"
            )
    finally:
        node.stop()


async def test_the_pin_cancels_in_the_window_and_wrong_pins_are_limited(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = _node(tmp_path, fakes)
    try:
        owner, phone, _friend = _people(node)
        olga = await Raw.open(node.url, token(owner))
        await olga.ok("subscribe", channel=f"user:{owner}")
        await olga.ok("pin.set", pin=PIN, duress_pin=DURESS)
        first = await olga.ok(
            "alert.trigger", kind="sos", location=HERE, client_alert_id="a1", delay_s=4
        )
        alert_id = first["alert_id"]
        assert await olga.error("alert.cancel", alert_id=alert_id, pin="0000") == "forbidden"
        cancelled = await olga.ok("alert.cancel", alert_id=alert_id, pin=PIN)
        assert _without(cancelled) == {"ok": True, "alert_id": alert_id, "state": "cancelled"}
        assert await olga.push() == {"push": "alert.cancelled", "alert_id": alert_id}
        stranger = await Raw.open(node.url, token("eve"))
        assert await stranger.error("alert.cancel", alert_id=alert_id, pin=PIN) == "forbidden"
        assert await olga.error("alert.cancel", alert_id=alert_id, pin="12") == "bad_request"
        assert await olga.error("alert.cancel", alert_id=alert_id) == "bad_request"
        again = await olga.ok("alert.cancel", alert_id=alert_id, pin=PIN)  # a retry
        assert _without(again) == _without(cancelled)
        status = await olga.ok("alert.status", alert_id=alert_id)
        assert status["state"] == "cancelled"
        assert {r["status"] for r in status["recipients"]} == {"cancelled"}
        retried = await olga.ok(
            "alert.trigger", kind="sos", location=HERE, client_alert_id="a1", delay_s=2
        )
        assert retried["state"] == "cancelled"
        resolved = await olga.ok("alert.resolve", alert_id=alert_id, outcome="safe", pin=PIN)
        assert resolved["state"] == "cancelled"
        await olga.ok("alert.location", alert_id=alert_id, location=NEARBY)  # kept nowhere
        # Sentinel: a second countdown, ending after the first one's, is not cancelled. When
        # its SMS comes, the first one's would have come before it: none did.
        after = max(1.0, (first["notify_at"] - time.time() * 1000) / 1000 + 1.5)
        second = await olga.ok(
            "alert.trigger", kind="sos", location=HERE, client_alert_id="a2", delay_s=after
        )
        assert second["notify_at"] > first["notify_at"]
        await until(lambda: _sent_at(fakes, phone), 15, what="the second alert's SMS")
        assert len(_sent_at(fakes, phone)) == 1
        assert _sent_at(fakes, phone)[0] >= second["notify_at"]
        assert await olga.error("alert.cancel", alert_id=second["alert_id"], pin=PIN) == "conflict"

        # Wrong PINs: 5 within 10 minutes, then refused whatever the PIN, while the window
        # runs out and the alert goes out (a thief cannot guess it away).
        third = await olga.ok(
            "alert.trigger", kind="sos", location=HERE, client_alert_id="a3", delay_s=3
        )
        for guess in ("0001", "0002", "0003", "0004", "0005"):
            assert await olga.error("alert.cancel", alert_id=third["alert_id"], pin=guess) == (
                "forbidden"
            )
        limited = await olga.cmd("alert.cancel", alert_id=third["alert_id"], pin=PIN)
        assert limited["error"]["code"] == "rate_limited", limited
        assert 0 < limited["error"]["retry_after_ms"] <= 600_000
        await until(lambda: len(_sent_at(fakes, phone)) == 2, 15, what="the third alert's SMS")
        assert _sent_at(fakes, phone)[1] >= third["notify_at"]
    finally:
        node.stop()


async def test_the_duress_pin_looks_like_a_cancel_and_raises_the_alarm_at_once(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = _node(tmp_path, fakes)
    try:
        owner, phone, friend = _people(node)
        olga = await Raw.open(node.url, token(owner))  # the phone, in someone else's hands
        await olga.ok("subscribe", channel=f"user:{owner}")
        bob = await Raw.open(node.url, token(friend))
        await bob.ok("subscribe", channel=f"user:{friend}")
        mod = await Raw.open(node.url, token("mia", roles=["user", "moderator"]))
        await olga.ok("pin.set", pin=PIN, duress_pin=DURESS)
        r = node.api("PUT", f"/v1/users/{friend}/push-tokens/tok-{friend}", json={})
        assert r.status_code == 201, r.text

        # What a real cancel looks like from the phone...
        normal = await olga.ok(
            "alert.trigger",
            kind="sos",
            location=HERE,
            note="help me",
            client_alert_id="n",
            delay_s=30,
        )
        n_id = normal["alert_id"]
        n_reply = await olga.ok("alert.cancel", alert_id=n_id, pin=PIN)
        n_push = await olga.push()
        n_status = await olga.ok("alert.status", alert_id=n_id)
        # ...and the duress PIN, the same way.
        duress = await olga.ok(
            "alert.trigger",
            kind="sos",
            location=HERE,
            note="help me",
            client_alert_id="d",
            delay_s=30,
        )
        d_id = duress["alert_id"]
        d_reply = await olga.ok("alert.cancel", alert_id=d_id, pin=DURESS)
        d_push = await olga.push()
        d_status = await olga.ok("alert.status", alert_id=d_id)
        assert _without(d_reply, "alert_id") == _without(n_reply, "alert_id")
        assert _without(d_push, "alert_id") == _without(n_push, "alert_id")
        assert _without(d_status, "alert_id") == _without(n_status, "alert_id")
        assert d_status["state"] == "cancelled"
        for cid, alert_id in (("n", n_id), ("d", d_id)):  # a retried trigger says the same
            again = await olga.ok(
                "alert.trigger", kind="sos", location=HERE, client_alert_id=cid, delay_s=30
            )
            assert _without(again, "alert_id", "channel") == {"ok": True, "state": "cancelled"}
            resolved = await olga.ok("alert.resolve", alert_id=alert_id, outcome="safe", pin=PIN)
            assert resolved["state"] == "cancelled"
        assert _without(
            await olga.ok("alert.cancel", alert_id=d_id, pin=PIN), "alert_id"
        ) == _without(n_reply, "alert_id")
        assert await olga.push() == {"push": "alert.cancelled", "alert_id": d_id}

        # Meanwhile the alarm went out at once, not after the 30 s window, flagged.
        await until(lambda: _sent_at(fakes, phone), 10, what="the duress alert's SMS")
        assert _sent_at(fakes, phone)[0] < duress["notify_at"] - 20_000
        sms = [r.body for r in fakes.sms if r.body.get("To") == phone]
        assert len(sms) == 1 and "DURESS" in sms[0]["Body"]
        alert = await bob.push()
        assert alert["push"] == "alert" and alert["alert_id"] == d_id
        assert alert["note"] == f"{DURESS_NOTE}. help me" and alert["state"] == "active"
        assert alert["duress"] is True
        await until(lambda: fakes.fcm_to(f"tok-{friend}"), 10, what="bob's push notification")
        assert fakes.fcm_to(f"tok-{friend}")[0]["data"]["duress"] == "1"
        seen = await mod.ok("alert.status", alert_id=d_id)
        assert seen["state"] == "active" and seen["duress"] is True
        listed = {a["alert_id"]: a for a in (await mod.ok("mod.alerts"))["alerts"]}
        assert listed[d_id]["duress"] is True and n_id not in listed

        # Live pushes leave the phone out: the owner may watch alert:<id> (as after any
        # cancel), the people alerted get them on their own channels.
        await olga.ok("subscribe", channel=f"alert:{d_id}")
        await bob.ok("alert.ack", alert_id=d_id)
        assert await bob.push() == {"push": "alert.ack", "alert_id": d_id, "user": friend}
        await olga.quiet()
        await olga.ok("alert.location", alert_id=d_id, location=NEARBY)  # the app keeps sending
        moved = await bob.push()
        assert moved["push"] == "alert.location" and moved["location"]["lat"] == NEARBY["lat"]
        await olga.quiet()
        trail = await bob.ok("alert.trail", alert_id=d_id)
        assert [p["lat"] for p in trail["points"]] == [HERE["lat"], NEARBY["lat"]]
        assert (await olga.ok("alert.status", alert_id=d_id))["state"] == "cancelled"
        assert await bob.error("alert.trail", alert_id=n_id) == "forbidden"  # never reached bob
    finally:
        node.stop()


async def test_the_duress_pin_after_the_window_resends_flagged(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = _node(tmp_path, fakes)
    try:
        owner, phone, _friend = _people(node)
        olga = await Raw.open(node.url, token(owner))
        await olga.ok("pin.set", pin=PIN, duress_pin=DURESS)
        alert_id = (
            await olga.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="x")
        )["alert_id"]
        await until(lambda: _sent_at(fakes, phone), 10, what="the alert's SMS")
        # Out already: both PINs are answered alike (too late), the duress one is acted on.
        assert await olga.error("alert.cancel", alert_id=alert_id, pin=PIN) == "conflict"
        assert await olga.error("alert.cancel", alert_id=alert_id, pin=DURESS) == "conflict"
        await until(lambda: len(_sent_at(fakes, phone)) == 2, 10, what="the flagged resend")
        sms = [r.body["Body"] for r in fakes.sms if r.body.get("To") == phone]
        assert ["DURESS" in body for body in sms] == [False, True]
    finally:
        node.stop()


async def test_a_node_killed_right_after_storing_the_duress_still_sends_it(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = _node(
        tmp_path,
        fakes,
        module="realtime_safety.loadtests.faults.node",
        RT_FAULT_KILL_AT="duress:stored",
    )
    try:
        owner, phone, _friend = _people(node)
        olga = await Raw.open(node.url, token(owner))
        await olga.ok("pin.set", pin=PIN, duress_pin=DURESS)
        reply = await olga.ok(
            "alert.trigger", kind="sos", location=HERE, client_alert_id="k", delay_s=30
        )
        await olga.send(
            {"id": 99, "op": "alert.cancel", "alert_id": reply["alert_id"], "pin": DURESS}
        )
        assert await olga.close_code() is not None  # the node died before it answered
        assert node.wait() != 0
        del node.env["RT_FAULT_KILL_AT"]
        node.start()
        # Nobody retries: the reconciler finds the alert due and sends it.
        await until(lambda: _sent_at(fakes, phone), 15, what="the SMS after the restart")
        assert _sent_at(fakes, phone)[0] < reply["notify_at"] - 10_000  # not after the window
        olga = await Raw.open(node.url, token(owner))
        retry = await olga.ok("alert.cancel", alert_id=reply["alert_id"], pin=DURESS)
        assert retry["state"] == "cancelled"
        assert len(_sent_at(fakes, phone)) == 1
    finally:
        node.stop()


async def test_pins_are_set_with_the_current_one_and_stored_only_hashed(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = _node(tmp_path, fakes)
    try:
        owner = f"pia-{uuid.uuid4().hex[:5]}"
        pia = await Raw.open(node.url, token(owner))
        assert await pia.error("pin.set", pin="123") == "bad_request"
        assert await pia.error("pin.set", pin="x" * 33) == "bad_request"
        assert await pia.error("pin.set", pin="4711", duress_pin="4711") == "bad_request"
        reply = await pia.ok("pin.set", pin="473829", duress_pin="918273")
        assert _without(reply) == {"ok": True, "pin": True, "duress_pin": True}
        # Replacing needs the current PIN (not the duress one): a thief cannot reset it.
        assert await pia.error("pin.set", pin="555555") == "forbidden"
        assert await pia.error("pin.set", pin="555555", current_pin="918273") == "forbidden"
        assert await pia.error("pin.set", pin="555555", current_pin="000000") == "forbidden"
        await pia.ok("pin.set", pin="555555", current_pin="473829")
        assert await pia.error("pin.set", pin="666666", current_pin="473829") == "forbidden"
        db = sqlite3.connect(Path(node.env["RT_DATA_DIR"]) / "alerts.sqlite3")
        (stored,) = db.execute(
            "SELECT doc FROM docs WHERE coll='pins' AND key=?", (owner,)
        ).fetchone()
        db.close()
        text = stored if isinstance(stored, str) else bytes(stored).decode(errors="replace")
        assert "$argon2id$" in text
        for pin in ("473829", "918273", "555555"):
            assert pin not in text and pin not in node.log()
    finally:
        node.stop()


async def test_the_owner_resolves_with_the_pin_and_the_duress_pin_only_seems_to(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = _node(tmp_path, fakes)
    try:
        owner, phone, _ = _people(node)
        olga = await Raw.open(node.url, token(owner))
        await olga.ok("pin.set", pin=PIN, duress_pin=DURESS)
        mod = await Raw.open(node.url, token("mia", roles=["user", "moderator"]))

        def bodies() -> list[str]:
            return [r.body["Body"] for r in fakes.sms if r.body.get("To") == phone]

        real = (await olga.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="r"))[
            "alert_id"
        ]
        fake = (await olga.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="f"))[
            "alert_id"
        ]
        await until(lambda: len(bodies()) == 2, 10, what="both alerts' SMS")
        assert await olga.error("alert.resolve", alert_id=real, outcome="safe") == "forbidden"
        assert (
            await olga.error("alert.resolve", alert_id=real, outcome="safe", pin="0000")
            == "forbidden"
        )
        r_reply = await olga.ok("alert.resolve", alert_id=real, outcome="safe", pin=PIN)
        f_reply = await olga.ok("alert.resolve", alert_id=fake, outcome="safe", pin=DURESS)
        assert _without(f_reply, "alert_id") == _without(r_reply, "alert_id")
        for alert_id in (real, fake):
            status = await olga.ok("alert.status", alert_id=alert_id)
            assert (status["state"], status["outcome"]) == ("resolved", "safe")
            assert await olga.error("alert.location", alert_id=alert_id, location=NEARBY) == (
                "conflict"
            )
            again = await olga.ok("alert.resolve", alert_id=alert_id, outcome="safe", pin=PIN)
            assert again["state"] == "resolved"
        # The real one tells its contact it is over; the other one is sent again, flagged.
        await until(lambda: len(bodies()) == 4, 10, what="the resolve notice and the resend")
        assert sum("resolved" in b for b in bodies()) == 1
        assert sum("DURESS" in b for b in bodies()) == 1
        seen = await mod.ok("alert.status", alert_id=fake)
        assert (seen["state"], seen["duress"]) == ("active", True)
        # Sentinel: when a moderator resolves it for real, that notice is the next SMS.
        await mod.ok("alert.resolve", alert_id=fake, outcome="handled")
        await until(lambda: len(bodies()) == 5, 10, what="the moderator's resolve notice")
        assert sum("resolved" in b for b in bodies()) == 2 and "handled" in bodies()[-1]
    finally:
        node.stop()
