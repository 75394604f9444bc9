"""Escalation agreed across nodes: two nodes share one MongoDB and one Redis, both run the
reconciler, and an unacknowledged alert still climbs its tiers one step at a time, each step's
messages sent once."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Node, RedisServer, base_env, token, unique_db
from pymongo import MongoClient
from wire import Raw

from loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.52, "lon": 13.405}


@pytest.fixture
def fakes() -> Any:
    with FakeProviders() as f:
        yield f


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
