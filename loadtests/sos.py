"""SOS under load (issue 21): does an alert get through while chat floods the node?

    python -m realtime_safety.loadtests sos-under-load [--topology embedded|redis]
        [--clients 600 --room-size 10 --interval 0.1 --seconds 20 --alerts 20]

One node, local fake FCM/Twilio reached through the real SDKs. First, with the node idle, a
few alerts measure the idle latency of `alert.trigger` sent -> first SMS request at the fake
Twilio. Then chat clients in rooms of `room-size` each post every `interval` seconds (600
clients at 0.1 s: 6,000 posts and 60,000 deliveries a second, well beyond what one node
delivers), and meanwhile `alerts` more alerts are triggered, one a second from the third
second on. Reported: the same SOS latency under the flood, its ratio to the idle p99, the
latency of the chat messages that were accepted, how many posts were refused, and alerts lost
(an alert whose SMS never came; a trigger answered `unavailable` is sent again with the same
client_alert_id, as the client library does, and counted in alerts_retried). Measured, never
asserted; loopback only, bounded.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
from websockets.asyncio.client import ClientConnection, connect

from .alerts import trigger_frame
from .chat import Chatters
from .fakeproviders import FakeProviders
from .support import pct
from .targets import TARGETS, Servers

FLOOD_START_S = 3.0  # alerts during the flood start this long after it, once the load is on


@dataclass
class SosResult:
    topology: str
    clients: int
    posts_per_s_offered: float
    posted: int
    accepted: int
    refused: int
    delivered: int
    expected: int
    chat_ms_p50: float
    chat_ms_p99: float
    sos_idle_ms_p50: float
    sos_idle_ms_p99: float
    sos_ms_p50: float
    sos_ms_p99: float
    sos_ms_max: float
    sos_vs_idle_p99: float
    alerts: int
    alerts_retried: int  # answered `unavailable` at least once (then sent again, as apps do)
    alerts_lost: int
    goal_met: bool  # SOS p99 <= 250 ms and <= 10x idle; accepted chat p99 <= 500 ms; none lost


def run(
    clients: int = 600,
    room_size: int = 10,
    interval: float = 0.1,
    seconds: float = 20.0,
    alerts: int = 20,
    idle_alerts: int = 10,
    *,
    topology: str = "embedded",
    processes: int = 2,
    timeout_s: float = 180.0,
) -> SosResult:
    if clients % room_size or room_size < 2:
        raise ValueError("clients must be a multiple of room_size (>= 2)")
    fakes = FakeProviders()
    work = Path(tempfile.mkdtemp(prefix="rt-sos-bench-"))
    api_key = secrets.token_hex(16)
    total = idle_alerts + alerts
    extra = {
        "RT_API_KEY": api_key,
        "RT_ALERT_TRIGGER_LIMIT": str(total + 10),
        **fakes.env(work),
    }
    try:
        with Servers("realtime", topology, extra) as servers:
            base = f"http://127.0.0.1:{servers.port}"
            for i in range(total):  # each owner has one SMS contact
                r = httpx.put(
                    f"{base}/v1/users/sos{i}/contacts",
                    json={"contacts": [{"phone": _phone(i)}]},
                    headers={"Authorization": f"Bearer {api_key}"},
                    timeout=30,
                )
                r.raise_for_status()
            target = TARGETS["realtime"](servers.secret)
            url = target.url(servers.port)
            deadline = time.time() + timeout_s
            crowd = Chatters("realtime", servers.secret, url, clients // room_size, room_size,
                             interval, seconds, deadline, processes)  # fmt: skip
            sent, retries = asyncio.run(
                _alerts(
                    f"ws://127.0.0.1:{servers.port}/ws",
                    servers.secret,
                    fakes,
                    idle_alerts,
                    alerts,
                    crowd.go,
                )
            )
            results = crowd.results()
            end = time.time() + 30
            while time.time() < end and len(_first_sms(fakes)) < total:
                time.sleep(0.1)
    finally:
        fakes.close()
    first = _first_sms(fakes)
    lat = {i: first[_phone(i)] - at for i, at in sent.items() if _phone(i) in first}
    idle = [lat[i] for i in range(idle_alerts) if i in lat]
    flood = [lat[i] for i in range(idle_alerts, total) if i in lat]
    chat = [x for r in results for x in r["latencies"]]
    posted = sum(r["posted"] for r in results)
    refused = sum(r["refused"] for r in results)
    idle_p99, sos_p99, chat_p99 = pct(idle, 99), pct(flood, 99), pct(chat, 99)
    lost = total - len(lat)
    return SosResult(
        topology,
        clients,
        round(clients / interval, 1),
        posted,
        posted - refused,
        refused,
        sum(r["received"] for r in results),
        sum(r["expected"] for r in results),
        pct(chat, 50),
        chat_p99,
        pct(idle, 50),
        idle_p99,
        pct(flood, 50),
        sos_p99,
        round(max(flood) * 1000, 1) if flood else float("nan"),
        round(sos_p99 / idle_p99, 1) if idle_p99 else float("nan"),
        total,
        len(set(retries)),
        lost,
        sos_p99 <= 250 and sos_p99 <= 10 * idle_p99 and chat_p99 <= 500 and lost == 0,
    )


def _phone(i: int) -> str:
    return f"+1555{i:07d}"


def _first_sms(fakes: FakeProviders) -> dict[str, float]:
    first: dict[str, float] = {}
    for r in list(fakes.sms):
        first.setdefault(r.body["To"], r.at)
    return first


async def _alerts(
    url: str, secret: str, fakes: FakeProviders, idle: int, flood: int, go: Callable[[], None]
) -> tuple[dict[int, float], list[int]]:
    """Idle alerts first (each waits for its SMS), then the flood starts (`go`) and the other
    alerts go out one a second from FLOOD_START_S on. Returns each alert's first send time,
    and the alerts sent again."""
    sent: dict[int, float] = {}
    retries: list[int] = []  # alerts answered `unavailable` and sent again, once per retry
    owners = [await _owner(url, secret, i) for i in range(idle + flood)]
    try:
        for i in range(idle):
            await _trigger(owners[i], i, sent, retries)
            while _phone(i) not in _first_sms(fakes):  # noqa: ASYNC110 (another thread's list)
                await asyncio.sleep(0.01)
        go()  # the chat processes start posting now
        start = time.time() + FLOOD_START_S

        async def one(k: int) -> None:
            await asyncio.sleep(max(0.0, start + k - time.time()))
            await _trigger(owners[idle + k], idle + k, sent, retries)

        await asyncio.gather(*(one(k) for k in range(flood)))
    finally:
        await asyncio.gather(*(ws.close() for ws in owners), return_exceptions=True)
    return sent, retries


async def _owner(url: str, secret: str, i: int) -> ClientConnection:
    token = jwt.encode({"sub": f"sos{i}", "exp": time.time() + 900}, secret, algorithm="HS256")
    ws = await connect(url, subprotocols=["rt.v1.json"])  # type: ignore[list-item]
    await ws.send(json.dumps({"id": 1, "op": "auth", "token": token}))
    reply = json.loads(await ws.recv())
    assert reply.get("ok"), reply
    return ws


async def _trigger(
    ws: ClientConnection, i: int, sent: dict[int, float], retries: list[int]
) -> None:
    """As the client library does: `unavailable` is retried with the same client_alert_id
    (after `retry_after_ms`), until the alert is stored; the first send is the start."""
    sent[i] = time.time()
    while True:
        await ws.send(trigger_frame(f"sos{i}"))
        while True:  # pushes may come first (none are expected, but do not mistake one)
            reply = json.loads(await ws.recv())
            if reply.get("id") == 2:
                break
        if reply.get("ok"):
            return
        assert reply["error"]["code"] == "unavailable", reply
        retries.append(i)
        await asyncio.sleep(reply["error"].get("retry_after_ms", 100) / 1000)
