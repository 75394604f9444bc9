"""Fault scenario: check-in timers (the dead-man switch) on two nodes sharing Redis and MongoDB,
while one node is killed right after claiming a timer (`RT_FAULT_KILL_AT=checkin:claimed`, then
started again without it) and Redis is restarted empty. Every missed check-in must raise its
alert exactly once, within 2 s of its expiry (the figure: alert stored - expiry), and every
contact must get the SMS once.

    python -m realtime_safety.loadtests faults checkin-fire-time [--scale 1]
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from typing import Any

import httpx
from pymongo import MongoClient
from websockets.asyncio.client import connect

from ..fakeproviders import FakeProviders
from ..support import pct
from .cluster import Cluster
from .report import FaultResult, Scenario

API_KEY = "faults-api-key-0123456789"
HERE = {"lat": 52.52, "lon": 13.405}
FIRST_S = 5.0  # the first timer's duration (every start is answered before it ends)
STEP_S = 0.2  # and each next one 0.2 s longer


async def _start(url: str, token: str, duration_s: float) -> dict[str, Any]:
    async with connect(url, subprotocols=["rt.v1.json"], open_timeout=10) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"id": 1, "op": "auth", "token": token}))
        await ws.send(
            json.dumps({"id": 2, "op": "checkin.start", "duration_s": duration_s, "location": HERE})
        )
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("id") == 2:
                return dict(frame)


async def _wait(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _run(cluster: Cluster, fakes: FakeProviders, count: int) -> dict[str, Any]:
    killer, other = cluster.nodes
    owners = [f"walker-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    phones = {o: f"+1555{uuid.uuid4().int % 10**7:07d}" for o in owners}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for owner in owners:
            r = await http.put(
                f"http://127.0.0.1:{other.port}/v1/users/{owner}/contacts",
                json={"contacts": [{"phone": phones[owner]}]},
                timeout=10,
            )
            r.raise_for_status()
    # Alternate nodes; the killer's own timer claims the first one (and it dies there).
    replies = await asyncio.gather(
        *(
            _start(cluster.url(i % 2), cluster.token(owner), FIRST_S + i * STEP_S)
            for i, owner in enumerate(owners)
        )
    )
    started = {o: r for o, r in zip(owners, replies, strict=True) if r.get("ok")}
    last = max((r["expires_at"] for r in started.values()), default=0) / 1000
    died = await _wait(lambda: not killer.running, FIRST_S + 10)
    assert killer.env is not None
    killer.env.pop("RT_FAULT_KILL_AT", None)
    # Redis loses everything while the other timers run; the killed node comes back.
    cluster.redis.kill()
    cluster.redis.start()
    killer.kill()
    killer.start()
    notified = await _wait(
        lambda: all(fakes.sms_to(phones[o]) for o in started), max(0, last - time.time()) + 30
    )
    await asyncio.sleep(2)  # a duplicate would come within a reconcile period
    assert cluster.nodes[0].env is not None
    uri, db = cluster.nodes[0].env["RT_MONGODB_URI"], cluster.nodes[0].env["RT_MONGODB_DB"]
    col: Any = MongoClient(uri)[db]["docs"]
    alerts = Counter(
        d["doc"]["owner"] for d in col.find({"coll": "alerts", "doc.kind": "checkin_missed"})
    )
    created = {
        d["doc"]["owner"]: d["doc"]["created"]
        for d in col.find({"coll": "alerts", "doc.kind": "checkin_missed"})
    }
    fire = [created[o] - r["expires_at"] for o, r in started.items() if o in created]
    sms_at = {
        o: min(r.at for r in fakes.sms if r.body.get("To") == phones[o])
        for o in started
        if fakes.sms_to(phones[o])
    }
    sms = [sms_at[o] * 1000 - r["expires_at"] for o, r in started.items() if o in sms_at]
    return {
        "started": len(started),
        "died": died and "fault: killed at checkin:claimed" in killer.tail(100_000),
        "notified": notified,
        "alerts": alerts,
        "sms": Counter({o: len(fakes.sms_to(phones[o])) for o in started}),
        "fire_ms": fire,
        "sms_ms": sms,
    }


def fire_time(scale: float) -> FaultResult:
    count = max(6, int(60 * scale))
    result = FaultResult(
        "checkin-fire-time",
        "check-ins expiring on 2 nodes; one killed at a claim, Redis restarted empty",
    )
    cluster = Cluster(nodes=2)
    with FakeProviders() as fakes:
        for node in cluster.nodes:
            assert node.env is not None
            node.env.update(
                RT_API_KEY=API_KEY,
                RT_ALERT_RECONCILE_S="1",
                RT_ALERT_RETRY_BASE_S="0.2",
                **fakes.env(cluster.work),
            )
        killer = cluster.nodes[0]
        assert killer.env is not None
        killer.env["RT_FAULT_KILL_AT"] = "checkin:claimed"
        module = killer.cmd.index("realtime_safety.realtime")
        killer.cmd[module] = "realtime_safety.loadtests.faults.node"
        with cluster:
            found = asyncio.run(_run(cluster, fakes, count))
    fire, sms = found["fire_ms"], found["sms_ms"]
    result.sent = count
    result.acked = found["started"]
    result.delivered = sum(1 for n in found["sms"].values() if n >= 1)
    result.lost = sum(1 for n in found["sms"].values() if n < 1)
    result.duplicated = sum(max(0, n - 1) for n in found["sms"].values()) + sum(
        max(0, n - 1) for n in found["alerts"].values()
    )
    if fire:
        result.extra["fire error ms p50"] = round(pct([f / 1000 for f in fire], 50))
        result.extra["max"] = round(max(fire))
        result.extra["min"] = round(min(fire))
    if sms:
        result.extra["expiry to SMS ms p50"] = round(pct([s / 1000 for s in sms], 50))
        result.extra["max SMS"] = round(max(sms))
    result.extra["killed at a claim"] = found["died"]
    on_time = bool(fire) and len(fire) == found["started"] and -2000 <= min(fire)
    on_time = on_time and max(fire) <= 2000
    result.ok = found["died"] and found["notified"] and on_time and not result.lost
    result.ok = result.ok and not result.duplicated and found["started"] == count
    if not result.ok:
        result.notes = f"{found}"
    return result


SCENARIOS: dict[str, Scenario] = {
    "checkin-fire-time": Scenario(
        "check-in timers fire once within 2 s of expiry: a node killed at a claim, Redis restarted",
        fire_time,
    ),
}
