"""Chat: many small rooms, everyone talking. N clients in rooms of K (2,000 in 200 rooms of
10 by default); each client posts every `interval` seconds (phases spread evenly), for
`seconds`. Every client is subscribed to its room, so each post reaches K sockets (K - 1 on
the peer, which skips the sender). Measures what a chat user feels: publish -> deliver
latency, publish -> acknowledgement latency, and whether every post reached every member.

    python -m realtime_safety.loadtests chat --clients 2000 --room-size 10 --intervals 5,2,1

Each interval is one load level (posts/s = clients / interval); the plot shows latency
percentiles against it, ours next to the peer.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from .clients import Tally, open_socket
from .support import pct, proc_stats
from .targets import TARGETS, Servers

TICK_S = 0.005


@dataclass
class ChatResult:
    scenario: str
    target: str
    clients: int
    rooms: int
    room_size: int
    interval_s: float
    posts_per_s: float
    posted: int
    acked: int
    delivered: int
    expected: int
    delivered_per_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_max: float
    ack_ms_p50: float
    ack_ms_p99: float
    server_cpu_s: float
    server_rss_mb: float
    client_cpu_s: float
    duration_s: float
    disconnects: str


async def _chatters(
    kind: str,
    secret: str,
    url: str,
    rooms: list[int],
    room_size: int,
    interval: float,
    seconds: float,
    go: Any,
    deadline: float,
    ready: Any,
    out: Any,
) -> None:
    target = TARGETS[kind](secret)
    tally = Tally(target, expected=2**62)  # known once everyone has posted
    members: list[tuple[str, int]] = []  # (room, socket index)
    for r in rooms:
        for j in range(room_size):
            sock = await open_socket(tally, url, kind)
            await target.subscribe(sock, r * room_size + j, room=f"chat-{r}")
            sock.counting = True
            members.append((f"chat-{r}", len(tally.sockets) - 1))
    ready.put(len(members))
    receivers = room_size if target.echo else room_size - 1
    tally.per_refusal = receivers  # a refused post is delivered to nobody
    await asyncio.to_thread(go.wait)  # every client process is set up
    # Everyone posts every `interval` s, phases spread evenly over the interval.
    start = time.time()
    schedule = sorted(
        (start + (k / len(members)) * interval + n * interval, k)
        for k in range(len(members))
        for n in range(int(seconds / interval))
    )
    for due, k in schedule:
        delay = due - time.time()
        if delay > TICK_S:
            await asyncio.sleep(delay)
        room, index = members[k]
        tally.sockets[index].publish(room)
    tally.expected = (len(schedule) - tally.refused) * receivers
    tally.check()
    try:
        async with asyncio.timeout(max(0.1, deadline - time.time())):
            await tally.done
    except TimeoutError:
        pass
    await asyncio.sleep(0.2)  # acknowledgements still on their way
    out.put(
        {
            "posted": len(schedule),
            "acked": len(tally.ack_latencies),
            "refused": tally.refused,
            "received": tally.received,
            "expected": tally.expected,
            "latencies": tally.latencies,
            "ack_latencies": tally.ack_latencies,
            "closes": dict(tally.closes),
            "cpu_s": proc_stats(os.getpid())[0],
            "elapsed": time.time() - start,
        }
    )
    tally.disconnect()


def _client_process(*args: Any) -> None:
    uvloop.run(_chatters(*args))


class Chatters:
    """The chat client processes, set up (connected and subscribed) on construction; `go`
    starts the posting and `results` waits for what each process saw."""

    def __init__(
        self,
        kind: str,
        secret: str,
        url: str,
        rooms: int,
        room_size: int,
        interval: float,
        seconds: float,
        deadline: float,
        processes: int = 2,
    ) -> None:
        ctx = mp.get_context("spawn")
        ready, self._out, self._go = ctx.Queue(), ctx.Queue(), ctx.Event()
        self._deadline = deadline
        shares = [list(range(rooms))[p::processes] for p in range(processes)]
        self._procs = [
            ctx.Process(
                target=_client_process,
                args=(
                    kind,
                    secret,
                    url,
                    share,
                    room_size,
                    interval,
                    seconds,
                    self._go,
                    deadline,
                    ready,
                    self._out,
                ),
            )
            for share in shares
            if share
        ]
        for p in self._procs:
            p.start()
        for _ in self._procs:
            ready.get(timeout=max(1.0, deadline - time.time()))

    def go(self) -> None:
        self._go.set()

    def results(self) -> list[dict[str, Any]]:
        timeout = max(1.0, self._deadline - time.time() + 10)
        results = [self._out.get(timeout=timeout) for _ in self._procs]
        for p in self._procs:
            p.join(10)
        return results

    def run(self) -> list[dict[str, Any]]:
        self.go()
        return self.results()


def run(
    kind: str,
    clients: int = 2000,
    room_size: int = 10,
    interval: float = 5.0,
    seconds: float = 20.0,
    *,
    processes: int = 2,
    topology: str = "redis",
    timeout_s: float = 120.0,
) -> ChatResult:
    if clients % room_size or room_size < 2:
        raise ValueError("clients must be a multiple of room_size (>= 2)")
    rooms = clients // room_size
    with Servers(kind, topology) as servers:
        target = TARGETS[kind](servers.secret)
        url = target.url(servers.port)
        deadline = time.time() + timeout_s
        crowd = Chatters(kind, servers.secret, url, rooms, room_size, interval, seconds,
                         deadline, processes)  # fmt: skip
        cpu1, _ = servers.stats()
        results = crowd.run()
        cpu2, rss = servers.stats()
    latencies = [x for r in results for x in r["latencies"]]
    acks = [x for r in results for x in r["ack_latencies"]]
    delivered = sum(r["received"] for r in results)
    duration = max(r["elapsed"] for r in results)
    return ChatResult(
        "chat",
        target.name,
        clients,
        rooms,
        room_size,
        interval,
        round(clients / interval, 1),
        sum(r["posted"] for r in results),
        sum(r["acked"] for r in results) if target.acks else 0,
        delivered,
        sum(r["expected"] for r in results),
        round(delivered / duration, 1),
        pct(latencies, 50),
        pct(latencies, 95),
        pct(latencies, 99),
        round(max(latencies) * 1000, 2) if latencies else float("nan"),
        pct(acks, 50),
        pct(acks, 99),
        round(cpu2 - cpu1, 2),
        round(rss / 2**20, 1),
        round(sum(r["cpu_s"] for r in results), 2),
        round(duration, 2),
        ",".join(f"{code}x{n}" for r in results for code, n in r["closes"].items()) or "none",
    )
