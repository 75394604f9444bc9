"""Escalation agreed across nodes: two nodes share one MongoDB and one Redis, both run the
reconciler, and an unacknowledged alert still climbs its tiers one step at a time, each step's
messages sent once."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from conftest import Node, RedisServer, base_env, token, unique_db
from pymongo import MongoClient
from wire import Raw

from realtime_safety.loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.52, "lon": 13.405}


async def test_two_nodes_escalate_each_step_once(
    tmp_path: Path, fakes: FakeProviders, redis_server: RedisServer, mongo_uri: str
) -> None:
    db = unique_db()
    env = {
        "RT_REDIS_URL": redis_server.url,
        "RT_MONGODB_URI": mongo_uri,
        "RT_MONGODB_DB": db,
        "RT_STORE_TIMEOUT_S": "10",
        "RT_ALERT_ESCALATE_S": "1",
        "RT_ALERT_RECONCILE_S": "1",
        **fakes.env(tmp_path),
    }
    nodes = [Node(base_env(tmp_path / n, RT_NODE_ID=n, **env), n) for n in ("a", "b")]
    for n in nodes:
        n.start()
    try:
        owner = f"una-{uuid.uuid4().hex[:5]}"
        tiers = {1: "+15550101", 2: "+15550102", 3: "+15550103"}
        contacts = [{"tier": t, "phone": p} for t, p in tiers.items()]
        nodes[0].api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": contacts})
        una = await Raw.open(nodes[1].url, token(owner))
        alert_id = (
            await una.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="esc")
        )["alert_id"]
        alerts = MongoClient(mongo_uri)[db]["docs"]

        def settled() -> dict[str, Any] | None:
            doc = alerts.find_one({"coll": "alerts", "key": alert_id})
            return doc if doc and doc["doc"]["escalations"] == 3 and doc["ix"] is None else None

        deadline = time.monotonic() + 30
        while (doc := await asyncio.to_thread(settled)) is None:
            assert time.monotonic() < deadline, "the alert never finished escalating"
            await asyncio.sleep(0.1)
        # Settled: no step is due any more and every planned message is finished, so what the
        # fake provider holds now is all there will be.
        sent = {t: fakes.accepted_sms.count(p) for t, p in tiers.items()}
        assert sent == {1: 2, 2: 1, 3: 1}  # alert + the resend; then one step per tier
        assert [j[2] for j in doc["doc"]["jobs"]] == [
            "alert",
            "escalate1",
            "escalate2",
            "escalate3",
        ]
        status = await una.ok("alert.status", alert_id=alert_id)
        assert {r["to"]: r["status"] for r in status["recipients"]} == {
            p: "sent" for p in tiers.values()
        }
        await una.close()
    finally:
        for n in nodes:
            n.stop()


async def test_concurrent_reconcile_passes_take_each_escalation_step_once(tmp_path: Path) -> None:
    """Two alert services (two nodes' worth) on one store, their reconcile passes interleaved
    at every await: both read the due alert before either writes, yet one step is taken (the
    compare-and-set refuses the second; and the step is a function of the alert, so even a
    second write would plan the same jobs under the same job keys)."""
    from realtime_safety.alerts.delivery import ROUTES
    from realtime_safety.alerts.providers import OutboxPush, OutboxSms
    from realtime_safety.alerts.queue import StoreJobQueue
    from realtime_safety.alerts.responders import Responders
    from realtime_safety.alerts.service import AlertService, AlertSettings
    from realtime_safety.storage.sqlite import SqliteStore

    store = SqliteStore(tmp_path)
    await store.open()

    async def publish(target: str, push: dict[str, Any]) -> None:
        return None

    async def offline(user: str) -> bool:
        return False

    def service(node: str) -> AlertService:
        return AlertService(
            store.docs,
            {r: StoreJobQueue(store.docs, r) for r in ROUTES},
            OutboxPush(tmp_path / f"{node}.jsonl"),
            OutboxSms(tmp_path / f"{node}.jsonl"),
            Responders(None, 60),
            publish,
            offline,
            AlertSettings(escalate_s=0.001, reconcile_s=60),
            node,
        )

    a, b = service("a"), service("b")
    try:
        await a.set_contacts("una", [{"tier": 1, "phone": "+1555"}, {"tier": 2, "user": "ivo"}])
        alert_id = (
            await a.trigger("una", {"kind": "sos", "location": HERE, "client_alert_id": "c"})
        )["alert_id"]
        for step in (1, 2):
            await asyncio.sleep(0.01)  # past the (1 ms) escalation deadline: both see it due
            await asyncio.gather(a.reconciler.reconcile_due(), b.reconciler.reconcile_due())
            doc = await store.docs.get("alerts", alert_id)
            assert doc is not None and doc["escalations"] == step
            purposes = [purpose for _, _, purpose in doc["jobs"]]
            assert purposes.count(f"escalate{step}") == (1 if step == 1 else 2)  # sms | ws+push
    finally:
        await store.close()
