"""Alert latency: from `alert.trigger` sent to the first provider request received.

    python -m loadtests alerts --alerts 200 --rate 20 [--topology redis|embedded]

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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from websockets.asyncio.client import connect

from .fakeproviders import FakeProviders


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


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000, 1)


def run(alerts: int, rate: float, topology: str) -> AlertLatency:
    work = Path(tempfile.mkdtemp(prefix="rt-alert-bench-"))
    fakes = FakeProviders()
    procs: list[subprocess.Popen[bytes]] = []
    secret = secrets.token_hex(32)
    api_key = secrets.token_hex(16)
    env = {
        **os.environ,
        "RT_JWT_SECRET": secret,
        "RT_API_KEY": api_key,
        "RT_DATA_DIR": str(work / "data"),
        "RT_ALERT_TRIGGER_LIMIT": "1000",
        **fakes.env(work),
    }
    mongo_kind = "-"
    try:
        if topology == "redis":
            redis_port = _port()
            procs.append(
                subprocess.Popen(
                    [
                        shutil.which("redis-server") or "redis-server",
                        "--port",
                        str(redis_port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(work),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
            _wait(redis_port)
            env["RT_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            uri = os.environ.get("MONGODB_URI")
            if uri:
                mongo_kind = "MONGODB_URI"
            else:
                mongo_port = _port()
                exe = shutil.which("secantusd-py") or str(
                    Path(sys.executable).parent / "secantusd-py"
                )
                procs.append(
                    subprocess.Popen(
                        [
                            exe,
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(mongo_port),
                            "--storage-path",
                            str(work / "mongo"),
                            "--standalone",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
                _wait(mongo_port)
                uri = f"mongodb://127.0.0.1:{mongo_port}/?directConnection=true"
                mongo_kind = "SecantusDB (local, slow)"
            env["RT_MONGODB_URI"] = uri
        port = _port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "realtime",
                    "serve",
                    "--port",
                    str(port),
                    "--log-level",
                    "error",
                ],
                env=env,
            )
        )
        _wait(port)
        base = f"http://127.0.0.1:{port}"
        phones = {}
        for i in range(alerts):
            owner, phone = f"owner{i}", f"+1555{i:07d}"
            phones[phone] = owner
            httpx.put(
                f"{base}/v1/users/{owner}/contacts",
                json={"contacts": [{"phone": phone}]},
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=30,
            )
        sent = asyncio.run(_trigger(f"ws://127.0.0.1:{port}/ws", secret, alerts, rate))
        deadline = time.time() + 30
        while time.time() < deadline and len({r.body["To"] for r in fakes.sms}) < alerts:
            time.sleep(0.1)
        first: dict[str, float] = {}
        for r in fakes.sms:
            first.setdefault(r.body["To"], r.at)
        latencies = [
            first[f"+1555{i:07d}"] - sent[i] for i in range(alerts) if f"+1555{i:07d}" in first
        ]
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        fakes.close()
    return AlertLatency(
        topology,
        mongo_kind,
        alerts,
        rate,
        _pct(latencies, 50),
        _pct(latencies, 95),
        _pct(latencies, 99),
        round(max(latencies) * 1000, 1),
        alerts - len(latencies),
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
            await ws.send(
                json.dumps(
                    {
                        "id": 2,
                        "op": "alert.trigger",
                        "kind": "sos",
                        "client_alert_id": f"b{i}",
                        "location": {"lat": 52.52, "lon": 13.405},
                    }
                )
            )
            reply: dict[str, Any] = json.loads(await ws.recv())
            assert reply.get("ok"), reply

    start = time.time() + 1.0
    await asyncio.gather(*(one(i) for i in range(alerts)))
    return sent
