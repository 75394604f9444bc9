"""Gaps found by mutation testing (scripts/mutate alerts): behaviour no other test pinned down.
Real server processes; the real firebase-admin SDK talks to a local fake FCM that records
every request."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from conftest import Node, RedisServer, base_env, token, unique_db
from wire import Raw, until

from realtime_safety.alerts.queue import RedisJobQueue
from realtime_safety.loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.5200, "lon": 13.4050}


async def test_the_alert_push_carries_where_and_who(alert_node: Node, fakes: FakeProviders) -> None:
    """The FCM data of an alert is what a locked phone shows without opening the app: the
    place (lat/lon as strings: FCM data values are strings), the kind, the owner, the state
    and the escalation count (mutant: alerts/delivery.py, the `data.update(lat=…, lon=…)`
    line removed)."""
    owner, carl = f"olga-{uuid.uuid4().hex[:5]}", f"carl-{uuid.uuid4().hex[:5]}"
    r = alert_node.api(
        "PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"tier": 1, "user": carl}]}
    )
    assert r.status_code == 200, r.text
    r = alert_node.api("PUT", f"/v1/users/{carl}/push-tokens/tok-{carl}", json={"platform": "ios"})
    assert r.status_code == 201, r.text
    olga = await Raw.open(alert_node.url, token(owner))
    reply = await olga.ok("alert.trigger", kind="medical", location=HERE, client_alert_id="a-1")

    await until(lambda: fakes.fcm_to(f"tok-{carl}"))
    data = fakes.fcm_to(f"tok-{carl}")[0]["data"]
    assert data["type"] == "alert" and data["alert_id"] == reply["alert_id"]
    assert (data["kind"], data["user"], data["state"]) == ("medical", owner, "active")
    assert data["escalation"] == "0"
    assert float(data["lat"]) == HERE["lat"] and float(data["lon"]) == HERE["lon"]
    # an iPhone shows it at once, even locked (mutant: alerts/providers.py, "apns-priority")
    apns = fakes.fcm_to(f"tok-{carl}")[0]["apns"]["headers"]
    assert apns["apns-priority"] == "10"
    assert apns["apns-collapse-id"] == f"alert-{reply['alert_id']}"[:64]
    await olga.close()


@pytest.mark.parametrize("ts", ["1700000000000", 1.5, None, [1]])
async def test_a_location_timestamp_must_be_integer_milliseconds(
    alert_node: Node, ts: object
) -> None:
    """A location's `ts` that is not an integer is refused as bad_request, not accepted nor an
    internal error (mutant: alerts/model.py, `isinstance(ts, bool) or not isinstance(ts, int)`
    with `and`)."""
    olga = await Raw.open(alert_node.url, token(f"olga-{uuid.uuid4().hex[:5]}"))
    location = {**HERE, "ts": ts}
    assert await olga.error("alert.trigger", kind="sos", location=location) == "bad_request"
    assert (await olga.ok("ping"))["ts"] > 0  # and the connection stays
    await olga.close()


async def test_an_unacknowledged_alert_is_resent_to_its_tier_before_the_next_tier(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """Escalation order: step 1 resends to the same tier, step 2 goes to the next tier
    (mutant: alerts/service.py, `tier = doc["tier"] if step == 1 else …` with `!=`)."""
    node = Node(
        base_env(tmp_path / "esc", RT_ALERT_ESCALATE_S="1", **fakes.env(tmp_path)), "esc"
    ).start()
    try:
        owner = f"ulla-{uuid.uuid4().hex[:5]}"
        first, second = f"first-{uuid.uuid4().hex[:4]}", f"second-{uuid.uuid4().hex[:4]}"
        contacts = [{"tier": 1, "user": first}, {"tier": 2, "user": second}]
        r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": contacts})
        assert r.status_code == 200, r.text
        for user in (first, second):
            r = node.api(
                "PUT", f"/v1/users/{user}/push-tokens/tok-{user}", json={"platform": "ios"}
            )
            assert r.status_code == 201, r.text
        ulla = await Raw.open(node.url, token(owner))
        await ulla.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="e1")

        await until(lambda: fakes.fcm_to(f"tok-{second}"), timeout=15)
        to_second = [m["data"]["escalation"] for m in fakes.fcm_to(f"tok-{second}")]
        to_first = [m["data"]["escalation"] for m in fakes.fcm_to(f"tok-{first}")]
        assert to_second[0] == "2"  # the next tier only at the second step
        assert to_first[:2] == ["0", "1"]  # the first tier: the alert, then its resend
        await ulla.close()
    finally:
        node.stop()


async def test_without_credentials_the_outbox_holds_the_sms_a_provider_would_get(
    tmp_path: Path,
) -> None:
    """The development outbox (no Twilio/FCM credentials) records the SMS exactly as it would
    be sent: the number and the text with the map link (mutant: alerts/providers.py, the
    outbox's SMS record)."""
    import json

    data = tmp_path / "o"
    node = Node(base_env(data), "outbox")  # no provider credentials at all
    node.start()
    try:
        phone = "+15550606"
        owner = f"oli-{uuid.uuid4().hex[:5]}"
        node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": phone}]})
        oli = await Raw.open(node.url, token(owner))
        await oli.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="o1")
        outbox = data / "outbox.jsonl"

        def sms() -> list[dict[str, str]]:
            if not outbox.exists():
                return []
            lines = [json.loads(line) for line in outbox.read_text().splitlines() if line]
            return [line for line in lines if line["route"] == "sms"]

        await until(sms, 10)
        (record,) = sms()
        assert record["to"] == phone
        assert record["body"].startswith(f"EMERGENCY (fire): {owner} needs help.")
        assert "https://maps.google.com/?q=52.520000,13.405000" in record["body"]
        await oli.close()
    finally:
        node.stop()


async def test_moderators_list_active_alerts_until_they_are_resolved(alert_node: Node) -> None:
    """`mod.alerts` lists an alert from its trigger until its resolve, with its recipients
    (mutant: alerts/service.py, the `active_alerts` record the list reads)."""
    owner = f"ali-{uuid.uuid4().hex[:5]}"
    alert_node.api(
        "PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": "+15550707"}]}
    )
    ali = await Raw.open(alert_node.url, token(owner))
    mod = await Raw.open(alert_node.url, token("mona", roles=["user", "moderator"]))
    alert_id = (await ali.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="m"))[
        "alert_id"
    ]
    listed = {a["alert_id"]: a for a in (await mod.ok("mod.alerts"))["alerts"]}
    assert listed[alert_id]["owner"] == owner and listed[alert_id]["kind"] == "sos"
    assert [r["to"] for r in listed[alert_id]["recipients"]] == ["+15550707"]
    await ali.ok("alert.resolve", alert_id=alert_id, outcome="safe")
    assert alert_id not in {a["alert_id"] for a in (await mod.ok("mod.alerts"))["alerts"]}
    await ali.close()
    await mod.close()


async def test_an_alert_is_pushed_to_at_most_50_devices_of_a_user(tmp_path: Path) -> None:
    """A user's push tokens are read 50 at most per alert: a user with 51 registered devices
    gets the alert on 50 of them, not 51 (mutant: alerts/delivery.py, the `50` of the token
    lookup as `51`). Read from the development outbox, which records the token list of each
    push as the provider would get it (the fake FCM does not take 50 concurrent requests)."""
    import json

    data = tmp_path / "o"
    node = Node(base_env(data), "outbox").start()  # no provider credentials: the outbox
    try:
        owner, carl = f"olga-{uuid.uuid4().hex[:5]}", f"carl-{uuid.uuid4().hex[:5]}"
        r = node.api(
            "PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"tier": 1, "user": carl}]}
        )
        assert r.status_code == 200, r.text
        tokens = {f"tok-{carl}-{i:02d}" for i in range(51)}
        for tok in tokens:
            r = node.api("PUT", f"/v1/users/{carl}/push-tokens/{tok}", json={})
            assert r.status_code == 201, r.text
        olga = await Raw.open(node.url, token(owner))
        await olga.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="many")
        outbox = data / "outbox.jsonl"

        def pushes() -> list[dict[str, Any]]:
            if not outbox.exists():
                return []
            lines = [json.loads(line) for line in outbox.read_text().splitlines() if line]
            return [line for line in lines if line["route"] == "push"]

        await until(pushes, 10, what="the push in the outbox")
        (record,) = pushes()
        assert len(record["tokens"]) == len(set(record["tokens"])) == 50
        assert set(record["tokens"]) <= tokens
        await olga.close()
    finally:
        node.stop()


async def test_a_retry_after_beyond_10_minutes_is_honoured_for_10_minutes(
    node_factory: Any,
    redis_server: RedisServer,
    mongo_uri: str,
    fakes: FakeProviders,
    tmp_path: Path,
) -> None:
    """A 429 with `Retry-After: 3600` is retried after 10 minutes, the longest Retry-After the
    delivery honours (README, "Providers that misbehave"); the retry's due time is read from
    the route's delayed-job set in Redis (mutant: alerts/delivery.py, `retry_after_max_s`
    600 as 601)."""
    node: Node = node_factory(
        "ra",
        RT_REDIS_URL=redis_server.url,
        RT_MONGODB_URI=mongo_uri,
        RT_MONGODB_DB=unique_db(),
        RT_ALERT_RETRY_BASE_S="0.05",
        **fakes.env(tmp_path),
    )
    owner, phone = f"rita-{uuid.uuid4().hex[:5]}", "+15550808"
    r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": phone}]})
    assert r.status_code == 200, r.text
    fakes.script.twilio_fail = [429]
    fakes.script.retry_after = "3600"
    rita = await Raw.open(node.url, token(owner))
    before = int(time.time() * 1000)
    await rita.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="ra")
    queue = RedisJobQueue(redis_server.url, "sms")  # only for the name of its delayed set
    client = aioredis.from_url(redis_server.url)
    try:

        async def delayed() -> tuple[list[tuple[bytes, float]], int] | None:
            entries = await client.zrange(queue.delayed, 0, -1, withscores=True)
            seen = int(time.time() * 1000)  # the retry was scheduled before this
            return (entries, seen) if entries else None

        entries, seen = await until(delayed, 15, what="the SMS retry to be scheduled")
    finally:
        await client.aclose()
        await queue.close()
    [(_, due)] = entries
    assert len(fakes.sms) == 1  # one refused attempt, nothing since
    assert before + 600_000 <= due <= seen + 600_000
    await rita.close()


async def test_a_node_with_alerts_stops_cleanly(alert_node: Node, fakes: FakeProviders) -> None:
    """SIGTERM on a node that delivered an alert: exit 0, and nothing in its log at warning
    level or above (every provider, queue and index closes without an error) (mutant:
    alerts/responders.py, `close` with its `self._redis is not None` negated, which calls
    None.aclose() on a node without Redis)."""
    owner = f"stella-{uuid.uuid4().hex[:5]}"
    r = alert_node.api(
        "PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": "+15550909"}]}
    )
    assert r.status_code == 200, r.text
    stella = await Raw.open(alert_node.url, token(owner))
    await stella.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="s")
    await until(lambda: fakes.sms_to("+15550909"), 10, what="the SMS")
    await stella.close()
    start = len(alert_node.log())
    alert_node.kill(signal.SIGTERM)
    assert alert_node.wait() == 0
    noise = [  # from the stop on; load shedding (realtime.overload) is the machine's, not ours
        line
        for line in alert_node.log()[start:].splitlines()
        if any(word in line for word in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"))
        and "realtime.overload" not in line
    ]
    assert noise == []


async def test_concurrent_triggers_never_exceed_the_limit(alert_node: Node) -> None:
    """Ten triggers of one user at once, on ten connections: exactly RT_ALERT_TRIGGER_LIMIT
    (5) are accepted, the others refused as rate_limited, however their reservations race
    (mutant: alerts/quota.py, the compare-and-set's result negated, so a reservation that
    lost the race returned as counted)."""
    owner = f"tess-{uuid.uuid4().hex[:5]}"
    raws = [await Raw.open(alert_node.url, token(owner)) for _ in range(10)]
    replies = await asyncio.gather(
        *(
            raw.cmd("alert.trigger", kind="sos", location=HERE, client_alert_id=f"t{i}")
            for i, raw in enumerate(raws)
        )
    )
    accepted = [r for r in replies if r["ok"]]
    refused = [r["error"]["code"] for r in replies if not r["ok"]]
    assert len(accepted) == 5 and refused == ["rate_limited"] * 5, replies
    await asyncio.gather(*(raw.close() for raw in raws))


async def test_the_resolve_reply_names_the_alert_and_its_state(alert_node: Node) -> None:
    """`alert.resolve` answers {alert_id, state: "resolved"}, and a retried resolve answers
    the same (mutant: alerts/service.py, now alerts/cancel.py, the reply's "alert_id" key
    misnamed)."""
    owner = f"rosa-{uuid.uuid4().hex[:5]}"
    rosa = await Raw.open(alert_node.url, token(owner))
    alert_id = (await rosa.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="r"))[
        "alert_id"
    ]
    for _ in range(2):  # the resolve, then its retry
        reply = await rosa.ok("alert.resolve", alert_id=alert_id, outcome="safe")
        del reply["id"]
        assert reply == {"ok": True, "alert_id": alert_id, "state": "resolved"}
    await rosa.close()


async def test_two_resolves_at_once_agree_on_one_outcome(alert_node: Node) -> None:
    """A resolve is final: when the owner and a moderator resolve one alert at the same
    moment with different outcomes, the first one stored stands and both report that one
    to the moderators (mutant: the resolve's change, `if doc["state"] == "resolved": return`
    with the state misnamed, which lets the later resolve overwrite the outcome)."""
    owner = f"rhea-{uuid.uuid4().hex[:5]}"
    rhea = await Raw.open(alert_node.url, token(owner))
    mia = await Raw.open(alert_node.url, token("mia", roles=["user", "moderator"]))
    alert_id = (await rhea.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="2"))[
        "alert_id"
    ]
    by_owner, by_moderator = await asyncio.gather(
        rhea.cmd("alert.resolve", alert_id=alert_id, outcome="safe"),
        mia.cmd("alert.resolve", alert_id=alert_id, outcome="handled"),
    )
    assert by_owner["ok"] and by_moderator["ok"], (by_owner, by_moderator)
    await mia.ok("ping")  # the moderators' pushes of both resolves came before its reply
    told = [
        p["outcome"]
        for p in mia.pushes
        if p.get("push") == "alert" and p.get("alert_id") == alert_id and "outcome" in p
    ]
    outcome = (await rhea.ok("alert.status", alert_id=alert_id))["outcome"]
    assert outcome in ("safe", "handled")
    assert told and set(told) == {outcome}, (told, outcome)
    for r in (rhea, mia):
        await r.close()


async def test_concurrent_checkin_starts_never_exceed_the_running_limit(alert_node: Node) -> None:
    """Six check-ins started by one user at once, on six connections: exactly
    RT_CHECKIN_LIMIT (3) run, the others are refused as too_large, however the starts race
    — a slot reserved by a start whose record is not written yet still counts (mutant:
    alerts/checkin.py, a fresh slot's age `now - since` as `now + since`, which dropped it
    as stale)."""
    owner = f"cleo-{uuid.uuid4().hex[:5]}"
    raws = [await Raw.open(alert_node.url, token(owner)) for _ in range(6)]
    replies = await asyncio.gather(
        *(
            raw.cmd("checkin.start", duration_s=600, location=HERE, client_checkin_id=f"c{i}")
            for i, raw in enumerate(raws)
        )
    )
    started = [r for r in replies if r["ok"]]
    refused = [r["error"]["code"] for r in replies if not r["ok"]]
    assert len(started) == 3 and refused == ["too_large"] * 3, replies
    assert await raws[0].error("checkin.start", duration_s=600, location=HERE) == "too_large"
    for r in started:
        await raws[0].ok("checkin.done", checkin_id=r["checkin_id"])
    await asyncio.gather(*(raw.close() for raw in raws))


async def test_a_contact_whose_number_is_also_a_contact_gets_one_sms_and_the_fallback_says_why(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """Ula's app does not confirm, so her SMS fallback comes due; but her number is also a
    contact of its own and already has the alert's SMS: no second text, and the fallback's
    durable record says why it was not needed, `texted` (mutant: alerts/fallback.py, that
    `return "texted"` as `return None`)."""
    import msgpack

    node = Node(
        base_env(
            tmp_path / "fb",
            RT_ALERT_RETRY_BASE_S="0.05",
            RT_ALERT_FALLBACK_S="3",  # the number's own SMS has long gone out by then
            **fakes.env(tmp_path),
        ),
        "fb",
    ).start()
    try:
        owner, ula, phone = (
            f"fio-{uuid.uuid4().hex[:5]}",
            f"ula-{uuid.uuid4().hex[:5]}",
            "+15550311",
        )
        contacts = [{"user": ula, "phone": phone}, {"phone": phone}]
        r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": contacts})
        assert r.status_code == 200, r.text
        fio = await Raw.open(node.url, token(owner))
        alert_id = (await fio.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="f"))[
            "alert_id"
        ]

        def fallback() -> dict[str, Any] | None:
            db = sqlite3.connect(Path(node.env["RT_DATA_DIR"]) / "alerts.sqlite3")
            try:
                row = db.execute(
                    "SELECT doc FROM docs WHERE coll='alert_fallbacks' AND key LIKE ?",
                    (f"{alert_id}|{ula}%",),
                ).fetchone()
            finally:
                db.close()
            record: dict[str, Any] | None = msgpack.unpackb(row[0]) if row else None
            return record if record and "settled" in record else None

        record = await until(fallback, 20, what="the fallback to settle")
        assert record["state"] == "texted"
        assert len(fakes.sms_to(phone)) == 1
        await fio.close()
    finally:
        node.stop()


async def test_an_sms_the_outbox_could_not_write_is_retried_until_it_can(tmp_path: Path) -> None:
    """A delivery that fails on the node's side (here the development outbox cannot be
    written: `outbox.jsonl` is a directory, an OSError as a full or read-only disk would be)
    is a transient failure: it is retried with backoff, and the SMS goes out once the file
    can be written, instead of being dead-lettered at the first attempt (mutant:
    alerts/delivery.py, `_failed(..., type(exc).__name__, False, None)` for StoreUnavailable,
    OSError and TimeoutError with `True`: permanent)."""
    import json

    data = tmp_path / "ob"
    outbox = data / "outbox.jsonl"
    outbox.mkdir(parents=True)  # nothing can be appended to it
    node = Node(base_env(data), "outbox-blocked").start()  # no credentials: the outbox
    try:
        phone, owner = "+15550808", f"otto-{uuid.uuid4().hex[:5]}"
        r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": phone}]})
        assert r.status_code == 200, r.text
        otto = await Raw.open(node.url, token(owner))
        reply = await otto.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="b1")

        async def failed_once() -> dict[str, Any] | None:
            status = await otto.ok("alert.status", alert_id=reply["alert_id"])
            [sms] = status["recipients"]
            return sms if sms["attempts"] >= 1 else None

        sms = await until(failed_once, 20, what="the first attempt to fail")
        assert sms["error"] == "IsADirectoryError", sms
        assert sms["status"] != "failed", sms  # one failed attempt of six: not given up yet
        outbox.rmdir()  # the disk is writable again; the next attempt (1 s backoff) sends it

        def written() -> list[dict[str, Any]]:
            if not outbox.is_file():
                return []
            return [json.loads(line) for line in outbox.read_text().splitlines() if line]

        [record] = await until(written, 30, what="the retried SMS in the outbox")
        assert (record["route"], record["to"]) == ("sms", phone)

        async def sent() -> bool:
            status = await otto.ok("alert.status", alert_id=reply["alert_id"])
            return status["recipients"][0]["status"] == "outbox"

        await until(sent, 10, what="the SMS to show as written to the outbox")
        await otto.close()
    finally:
        node.stop()


class _RacedDocs:
    """The embedded store's documents, with another node's write landing between the
    fallback's read of the alert and its first compare-and-set (as when an `alert.ack` or the
    reconciler writes the same alert at that moment)."""

    def __init__(self, docs: Any) -> None:
        self._docs = docs
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._docs, name)

    async def put(self, coll: str, key: str, doc: dict[str, Any], ix: Any = None, *,
                  version: int | None = None) -> bool:  # fmt: skip
        if coll == "alerts" and version is not None and not self.raced:
            self.raced = True
            current = await self._docs.get(coll, key)
            other = {**current, "acked_by": ["someone"]}
            assert await self._docs.put(coll, key, other, ix=ix, version=current["_v"])
        result: bool = await self._docs.put(coll, key, doc, ix=ix, version=version)
        return result


async def test_the_fallback_sms_is_in_the_plan_even_when_another_write_wins_the_race(
    tmp_path: Path,
) -> None:
    """The fallback appends its SMS to the alert's plan with a compare-and-set; when another
    write of the alert lands first, it reads again and appends again, so the plan the
    reconciler works from always holds the SMS (mutant: alerts/fallback.py `_plan`, a lost
    compare-and-set taken as a success)."""
    from realtime_safety.alerts.fallback import Fallbacks
    from realtime_safety.alerts.metrics import AlertMetrics
    from realtime_safety.storage.sqlite import SqliteStore

    store = SqliteStore(tmp_path)
    await store.open()
    try:
        docs = _RacedDocs(store.docs)
        alert = {"id": "a1", "state": "active", "acked_by": [], "jobs": [], "due": None}
        assert await store.docs.insert("alerts", "a1", alert, ix=None) is None

        async def queue_sms(*_: Any) -> None:
            return None

        fallbacks = Fallbacks(docs, queue_sms, AlertMetrics(), after_s=1, lease_s=5)
        job = ["sms", "+15550001", "alert"]
        assert await fallbacks._plan("a1", job)
        assert docs.raced
        stored = await store.docs.get("alerts", "a1")
        assert stored is not None and stored["jobs"] == [job]
        assert stored["acked_by"] == ["someone"]  # the other write stands too
    finally:
        await store.close()
