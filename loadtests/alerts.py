"""Alert latency: from `alert.trigger` sent to the first provider request received.

    python -m realtime_safety.loadtests alerts --alerts 200 --rate 20 [--topology redis|embedded]

Starts a node (the Redis deployment by default: its own redis-server, and MongoDB from
MONGODB_URI or else a local SecantusDB), local fake FCM/token/Twilio servers reached through
the real SDKs, gives each alert's owner one SMS contact, triggers alerts at a fixed rate and
reports p50/p95/p99/max of trigger -> first Twilio request. Loopback only, bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from websockets.asyncio.client import connect

from .fakeproviders import FakeProviders
from .support import pct
from .targets import Servers


@dataclass
class AlertLatency:
    topology: str
    mongodb: str
    alerts: int
    rate_per_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_max: float
    missing: int


def run(alerts: int, rate: float, topology: str) -> AlertLatency:
    fakes = FakeProviders()
    work = Path(tempfile.mkdtemp(prefix="rt-alert-bench-"))
    api_key = secrets.token_hex(16)
    extra = {"RT_API_KEY": api_key, "RT_ALERT_TRIGGER_LIMIT": "1000", **fakes.env(work)}
    try:
        with Servers("realtime", topology, extra) as servers:
            base = f"http://127.0.0.1:{servers.port}"
            for i in range(alerts):  # each owner has one SMS contact
                httpx.put(
                    f"{base}/v1/users/owner{i}/contacts",
                    json={"contacts": [{"phone": f"+1555{i:07d}"}]},
                    headers={"Authorization": f"Bearer {api_key}"},
                    timeout=30,
                )
            sent = asyncio.run(
                _trigger(f"ws://127.0.0.1:{servers.port}/ws", servers.secret, alerts, rate)
            )
            deadline = time.time() + 30
            while time.time() < deadline and len({r.body["To"] for r in fakes.sms}) < alerts:
                time.sleep(0.1)
    finally:
        fakes.close()
    first: dict[str, float] = {}
    for r in fakes.sms:
        first.setdefault(r.body["To"], r.at)
    latencies = [
        first[f"+1555{i:07d}"] - sent[i] for i in range(alerts) if f"+1555{i:07d}" in first
    ]
    mongo = (
        "-"
        if topology == "embedded"
        else "MONGODB_URI"
        if os.environ.get("MONGODB_URI")
        else "SecantusDB (local, slow)"
    )
    return AlertLatency(
        topology,
        mongo,
        alerts,
        rate,
        pct(latencies, 50),
        pct(latencies, 95),
        pct(latencies, 99),
        round(max(latencies) * 1000, 1) if latencies else float("nan"),
        alerts - len(latencies),
    )


def trigger_frame(client_alert_id: str) -> str:
    """An SOS `alert.trigger` (command id 2) at a fixed place."""
    return json.dumps(
        {
            "id": 2,
            "op": "alert.trigger",
            "kind": "sos",
            "client_alert_id": client_alert_id,
            "location": {"lat": 52.52, "lon": 13.405},
        }
    )


async def _trigger(url: str, secret: str, alerts: int, rate: float) -> dict[int, float]:
    sent: dict[int, float] = {}

    async def one(i: int) -> None:
        token = jwt.encode(
            {"sub": f"owner{i}", "exp": time.time() + 600}, secret, algorithm="HS256"
        )
        async with connect(url) as ws:
            await ws.send(json.dumps({"id": 1, "op": "auth", "token": token}))
            await ws.recv()
            await asyncio.sleep(max(0.0, start + i / rate - time.time()))
            sent[i] = time.time()
            await ws.send(trigger_frame(f"b{i}"))
            reply: dict[str, Any] = json.loads(await ws.recv())
            assert reply.get("ok"), reply

    start = time.time() + 1.0
    await asyncio.gather(*(one(i) for i in range(alerts)))
    return sent
