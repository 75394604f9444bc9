"""Presence benchmark: the cost of join/leave at a given rate, on a channel that already holds
many members, through the real tracker and a real redis-server.

    python -m realtime_safety.loadtests presence --rate 1000 --seconds 5 --members 10000

Starts its own redis-server on a free loopback port (or uses --redis-url), fills one channel
with `--members` users, then performs joins and leaves at `--rate` per second for `--seconds`
(each join followed by the same user's leave half a second later) and reports achieved ops/s,
per-operation latency p50/p99, Redis round trips (pipelines) per operation, and Redis CPU per
operation.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from realtime_safety.presence.store import RedisPresence
from realtime_safety.presence.tracker import PresenceTracker

from .support import free_port, pct, redis_command, wait_port


@dataclass
class PresenceResult:
    members_before: int
    rate_target: float
    operations: int
    ops_per_s: float
    latency_ms_p50: float
    latency_ms_p99: float
    redis_round_trips: int
    round_trips_per_op: float
    redis_cpu_us_per_op: float


async def _cpu(url: str) -> float:
    r = aioredis.from_url(url)
    info = await r.info("cpu")
    await r.aclose()
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def _run(url: str, rate: float, seconds: float, members: int) -> PresenceResult:
    store = RedisPresence(url)
    pushes = 0

    async def publish(channel: str, kind: str, user: str) -> None:
        nonlocal pushes
        pushes += 1

    tracker = PresenceTracker(store, "bench-node", publish, heartbeat_s=60, node_timeout_s=180)
    channel = "room:big"
    for start in range(0, members, 1000):  # pre-fill, in pipelines of 1000
        await store.join(
            "filler",
            [(channel, f"m{i}") for i in range(start, min(members, start + 1000))],
            int(time.time() * 1000),
        )
    before_cpu = await _cpu(url)
    before_flushes = tracker._batch.flushes
    latencies: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int) -> None:
        user = f"u{i}"
        t = time.perf_counter()
        await tracker.add(channel, user)
        latencies.append(time.perf_counter() - t)
        await asyncio.sleep(0.5)
        t = time.perf_counter()
        await tracker.remove(channel, user)
        latencies.append(time.perf_counter() - t)

    total = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0 - 0.5
    ops = 2 * total
    cpu = await _cpu(url) - before_cpu
    trips = tracker._batch.flushes - before_flushes
    page = await store.members(channel, 0, 10)
    await store.close()
    assert page.total == members, "every benchmark user left again"
    return PresenceResult(
        members,
        rate,
        ops,
        round(ops / elapsed, 1),
        pct(latencies, 50),
        pct(latencies, 99),
        trips,
        round(trips / ops, 3),
        round(cpu / ops * 1e6, 1),
    )


def run(rate: float, seconds: float, members: int, redis_url: str | None) -> PresenceResult:
    if redis_url:
        return asyncio.run(_run(redis_url, rate, seconds, members))
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="rt-presence-bench-")
    proc = subprocess.Popen(
        redis_command(port, workdir),
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        return asyncio.run(_run(f"redis://127.0.0.1:{port}/0", rate, seconds, members))
    finally:
        proc.terminate()
        proc.wait(10)
