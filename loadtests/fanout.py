"""Fan-out benchmark: 1 publisher -> 1 channel -> N subscribers on one node (embedded defaults).

    python -m loadtests fanout --subscribers 1000 --messages 200 --rate 100

Starts a real `realtime serve` process on a loopback port, opens the subscribers from several
client processes (so the client is not the bottleneck; its CPU is reported), publishes at a fixed
rate with the send time inside each message, and reports delivered messages/s, publish->deliver
latency percentiles, server CPU and RSS. Bounded in count and time; loopback only.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jwt
from websockets.asyncio.client import connect

CHANNEL = "public:bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _token(secret: str, user: str) -> str:
    return jwt.encode({"sub": user, "exp": time.time() + 3600}, secret, algorithm="HS256")


def _proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


async def _subscribers(
    url: str,
    secret: str,
    first: int,
    count: int,
    expected: int,
    deadline: float,
    ready: Any,
    out: Any,
) -> None:
    socks = []
    for i in range(first, first + count):
        ws = await connect(url, subprotocols=["rt.v1.json"], max_size=None)  # type: ignore[list-item]
        await ws.send(json.dumps({"id": 1, "op": "auth", "token": _token(secret, f"s{i}")}))
        await ws.recv()
        await ws.send(json.dumps({"id": 2, "op": "subscribe", "channel": CHANNEL}))
        await ws.recv()
        socks.append(ws)
    ready.put(count)
    latencies: list[float] = []
    received = 0

    async def read(ws: Any) -> None:
        nonlocal received
        got = 0
        while got < expected:
            remaining = deadline - time.time()
            if remaining <= 0:
                return
            try:
                data = await asyncio.wait_for(ws.recv(), remaining)
            except (TimeoutError, Exception):
                return
            now = time.time()
            frame = json.loads(data)
            if frame.get("push") == "message":
                got += 1
                received += 1
                latencies.append(now - float(frame["body"]["text"]))

    await asyncio.gather(*(read(ws) for ws in socks))
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    out.put({"received": received, "latencies": latencies, "cpu_s": cpu.ru_utime + cpu.ru_stime})
    for ws in socks:
        await ws.close()


def _client_process(*args: Any) -> None:
    try:
        import uvloop

        uvloop.run(_subscribers(*args))
    except ImportError:
        asyncio.run(_subscribers(*args))


@dataclass
class Result:
    scenario: str
    subscribers: int
    messages: int
    rate_per_s: float
    delivered: int
    expected: int
    delivered_per_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_max: float
    server_cpu_s: float
    server_rss_mb: float
    server_rss_kb_per_connection: float
    client_cpu_s: float
    client_processes: int
    duration_s: float


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000


async def _publish(url: str, secret: str, messages: int, rate: float) -> None:
    async with connect(url, subprotocols=["rt.v1.json"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"id": 0, "op": "auth", "token": _token(secret, "publisher")}))
        await ws.recv()
        start = time.perf_counter()
        for i in range(messages):
            target = start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(
                json.dumps(
                    {
                        "id": i + 1,
                        "op": "publish",
                        "channel": CHANNEL,
                        "client_msg_id": f"b{i}",
                        "body": {"v": 1, "alg": "none", "text": repr(time.time())},
                    }
                )
            )
        for _ in range(messages):  # every publish acknowledged
            await ws.recv()


def run(subscribers: int, messages: int, rate: float, clients: int, timeout_s: float) -> Result:
    secret = secrets.token_hex(32)
    port = _free_port()
    data = tempfile.mkdtemp(prefix="rt-bench-")
    env = {
        **os.environ,
        "RT_JWT_SECRET": secret,
        "RT_DATA_DIR": data,
        "RT_RATE_PER_S": "100000",
        "RT_RATE_BURST": "100000",
        "RT_SEND_QUEUE_FRAMES": "100000",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "realtime", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        _, rss0 = _proc_stats(server.pid)
        ctx = mp.get_context("spawn")
        ready, out = ctx.Queue(), ctx.Queue()
        deadline = time.time() + timeout_s
        per = [
            subscribers // clients + (1 if i < subscribers % clients else 0) for i in range(clients)
        ]
        procs = [
            ctx.Process(
                target=_client_process,
                args=(url, secret, sum(per[:i]), n, messages, deadline, ready, out),
            )
            for i, n in enumerate(per)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=timeout_s)
        _, rss_connected = _proc_stats(server.pid)
        cpu1, _ = _proc_stats(server.pid)
        t0 = time.perf_counter()
        asyncio.run(_publish(url, secret, messages, rate))
        results = [out.get(timeout=max(1.0, deadline - time.time() + 5)) for _ in procs]
        duration = time.perf_counter() - t0
        for p in procs:
            p.join(10)
        cpu2, rss2 = _proc_stats(server.pid)
    finally:
        server.terminate()
        server.wait(20)
    latencies = [x for r in results for x in r["latencies"]]
    delivered = sum(r["received"] for r in results)
    return Result(
        scenario="fanout",
        subscribers=subscribers,
        messages=messages,
        rate_per_s=rate,
        delivered=delivered,
        expected=subscribers * messages,
        delivered_per_s=round(delivered / duration, 1),
        latency_ms_p50=round(_pct(latencies, 50), 2),
        latency_ms_p95=round(_pct(latencies, 95), 2),
        latency_ms_p99=round(_pct(latencies, 99), 2),
        latency_ms_max=round(max(latencies) * 1000 if latencies else float("nan"), 2),
        server_cpu_s=round(cpu2 - cpu1, 2),
        server_rss_mb=round(rss2 / 2**20, 1),
        server_rss_kb_per_connection=round((rss_connected - rss0) / 1024 / subscribers, 1),
        client_cpu_s=round(sum(r["cpu_s"] for r in results), 2),
        client_processes=clients,
        duration_s=round(duration, 2),
    )


def report(result: Result, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"fanout-{stamp}.json").write_text(json.dumps(asdict(result), indent=2))
    rows = "\n".join(f"| {k} | {v} |" for k, v in asdict(result).items())
    return f"| metric | value |\n|---|---|\n{rows}\n"
