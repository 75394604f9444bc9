"""Side-by-side benchmarks on one machine: our server, the python-socketio + Redis peer, and
the raw `websockets` broadcast ceiling, driven by the same client code.

    python -m realtime_safety.loadtests compare --subscribers 1000,5000 --messages 100 --rate 100
    python -m realtime_safety.loadtests idle --connections 5000

Scenarios:
- fan-out: 1 publisher -> 1 channel -> N subscribers, publishing at `rate`/s; every message
  carries its send time, subscribers (in several client processes; their CPU is reported)
  count deliveries and measure publish -> deliver latency.
- idle: N authenticated, subscribed connections doing nothing: server memory per connection.

Every run is bounded (messages, `--timeout`) and uses loopback only. Results: a JSON file, a
Markdown table and PNG plots in `--out` (default loadtests/results/).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from websockets.asyncio.client import connect

from .clients import Tally, open_socket
from .support import pct, proc_stats
from .targets import TARGETS, Ours, Servers, Target, subprotocols

# --- client processes ---------------------------------------------------------------


async def _subscribers(
    kind: str,
    secret: str,
    url: str,
    first: int,
    count: int,
    expected: int,
    deadline: float,
    ready: Any,
    out: Any,
) -> None:
    tally = Tally(TARGETS[kind](secret), expected * count, per_socket=expected)
    for i in range(first, first + count):
        sock = await open_socket(tally, url, kind)
        await tally.target.subscribe(sock, i)
        sock.counting = True
    ready.put(count)
    try:
        async with asyncio.timeout(max(0.1, deadline - time.time())):
            await tally.done
    except TimeoutError:
        pass
    out.put(
        {
            "received": tally.received,
            "latencies": tally.latencies,
            "closes": dict(tally.closes),
            "short": tally.incomplete(),
            "cpu_s": proc_stats(os.getpid())[0],
        }
    )
    tally.disconnect()


def _client_process(*args: Any) -> None:
    uvloop.run(_subscribers(*args))


# --- a run ----------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    target: str
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
    server_us_per_delivery: float  # server CPU per delivered message: what it costs, whatever
    # the clients could take (on a shared 2-core box they compete with the server)
    server_rss_mb: float
    server_kb_per_connection: float
    client_cpu_s: float
    duration_s: float
    disconnects: str  # close codes seen by subscribers, e.g. "4008x12"
    incomplete: int  # subscribers still missing messages at the end (0 = all delivered)
    acked: int  # publishes the server acknowledged
    publisher_closed: str  # close code if the server closed the publisher's connection
    nodes: int = 1


def fanout(
    kind: str,
    subscribers: int,
    messages: int,
    rate: float,
    *,
    clients: int = 2,
    timeout_s: float = 120,
    topology: str = "redis",
    nodes: int = 1,
) -> Result:
    """Subscribers are spread over the nodes (client process i on node i % nodes); the
    publisher is on the first node."""
    with Servers(kind, topology, nodes=nodes) as servers:
        target = TARGETS[kind](servers.secret)
        url = target.url(servers.port)
        urls = [target.url(port) for port in servers.ports]
        _, rss0 = servers.stats()
        ctx = mp.get_context("spawn")
        ready, out = ctx.Queue(), ctx.Queue()
        deadline = time.time() + timeout_s
        per = [
            subscribers // clients + (1 if i < subscribers % clients else 0) for i in range(clients)
        ]
        procs = [
            ctx.Process(
                target=_client_process,
                args=(
                    kind,
                    servers.secret,
                    urls[i % nodes],
                    sum(per[:i]),
                    n,
                    messages,
                    deadline,
                    ready,
                    out,
                ),
            )
            for i, n in enumerate(per)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=timeout_s)
        cpu1, rss1 = servers.stats()
        t0 = time.perf_counter()
        acked, publisher_closed = asyncio.run(_publish(target, url, messages, rate, deadline))
        results = [out.get(timeout=max(1.0, deadline - time.time() + 10)) for _ in procs]
        duration = time.perf_counter() - t0
        for p in procs:
            p.join(10)
        cpu2, rss2 = servers.stats()
    latencies = [x for r in results for x in r["latencies"]]
    delivered = sum(r["received"] for r in results)
    return Result(
        "fanout",
        target.name,
        subscribers,
        messages,
        rate,
        delivered,
        subscribers * messages,
        round(delivered / duration, 1),
        pct(latencies, 50),
        pct(latencies, 95),
        pct(latencies, 99),
        round(max(latencies) * 1000, 2) if latencies else float("nan"),
        round(cpu2 - cpu1, 2),
        round((cpu2 - cpu1) / delivered * 1e6, 1) if delivered else float("nan"),
        round(rss2 / 2**20, 1),
        round((rss1 - rss0) / 1024 / subscribers, 1),
        round(sum(r["cpu_s"] for r in results), 2),
        round(duration, 2),
        ",".join(f"{code}x{n}" for r in results for code, n in r["closes"].items()) or "none",
        sum(r["short"] for r in results),
        acked,
        publisher_closed or "no",
        nodes,
    )


async def _publish(
    target: Target, url: str, messages: int, rate: float, deadline: float
) -> tuple[int, str]:
    """Publish at `rate`, then wait for every acknowledgement (a publish is only durable
    once acknowledged: closing before that may lose it, by design). Returns the acks seen
    and how the server ended the publisher's connection ("" if it did not)."""
    async with connect(
        url,
        max_size=None,
        max_queue=None,
        subprotocols=subprotocols("realtime" if isinstance(target, Ours) else ""),
    ) as ws:
        await target.publisher(ws)
        acked = 0
        all_acked = asyncio.Event()

        async def drain() -> None:  # replies and pings to the publisher
            nonlocal acked
            async for data in ws:
                raw = data.encode() if isinstance(data, str) else data
                answer = target.reply_to(raw)
                if answer is not None:
                    await ws.send(answer.decode())
                elif target.is_ack(raw):
                    acked += 1
                    if acked >= messages:
                        all_acked.set()

        reader = asyncio.create_task(drain())
        start = time.perf_counter()
        for n in range(messages):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(target.publish_frame(n, time.time()))
        if target.acks:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.time())):
                    await all_acked.wait()
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(0.5)
        reader.cancel()
        closed = "" if ws.close_code is None else str(ws.close_code)
    return (acked if target.acks else messages), closed


def idle(kind: str, connections: int, *, topology: str = "embedded") -> dict[str, Any]:
    """Memory per idle, authenticated, subscribed connection on the server, and whether the
    server still answers once it holds them all."""
    with Servers(kind, topology) as servers:
        target = TARGETS[kind](servers.secret)
        url = target.url(servers.port)
        _, before = proc_stats(servers.pid)

        async def hold() -> tuple[int, int]:
            tally = Tally(target, 0)
            gate = asyncio.Semaphore(32)  # set-ups in flight

            async def one(i: int) -> None:
                async with gate:
                    sock = await open_socket(tally, url, kind)
                    await target.subscribe(sock, i)
                    sock.counting = True

            await asyncio.gather(*(one(i) for i in range(connections)))
            await asyncio.sleep(2)
            _, after = proc_stats(servers.pid)
            held = len(tally.sockets) - tally.gone
            tally.disconnect()
            return after, held

        after, held = uvloop.run(hold())
    return {
        "scenario": "idle",
        "target": TARGETS[kind].name,
        "connections": connections,
        "held": held,
        "server_rss_mb": round(after / 2**20, 1),
        "server_kb_per_connection": round((after - before) / 1024 / connections, 1),
    }


def write(results: list[dict[str, Any]], out: Path, name: str) -> str:
    """JSON, Markdown and PNG plots; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{name}-{stamp}.json").write_text(json.dumps(results, indent=2))
    keys = list(results[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in results]
    table = "\n".join(lines) + "\n"
    (out / f"{name}-{stamp}.md").write_text(table)
    if results[0].get("scenario") == "fanout":
        _plot(results, out / f"{name}-{stamp}.png")
    elif results[0].get("scenario") == "chat":
        _plot_chat(results, out / f"{name}-{stamp}.png")
    return table


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    """Delivered msg/s, p99 latency, and CPU per delivery (the server's and the clients'),
    against subscribers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    for n, target in enumerate(dict.fromkeys(r["target"] for r in results)):
        rows = [r for r in results if r["target"] == target]
        xs = [r["subscribers"] for r in rows]
        color = f"C{n}"
        left.plot(xs, [r["delivered_per_s"] for r in rows], marker="o", color=color, label=target)
        mid.plot(xs, [r["latency_ms_p99"] for r in rows], marker="o", color=color, label=target)
        right.plot(
            xs,
            [r["server_us_per_delivery"] for r in rows],
            marker="o",
            color=color,
            label=f"{target}: server",
        )
        right.plot(
            xs,
            [r["client_cpu_s"] / r["delivered"] * 1e6 if r["delivered"] else None for r in rows],
            "--",
            marker="x",
            color=color,
            label=f"{target}: clients",
        )
    left.set(title="delivered messages/s (higher is better)", xlabel="subscribers")
    mid.set(title="publish -> deliver p99 ms (lower is better)", xlabel="subscribers", yscale="log")
    right.set(title="CPU µs per delivered message", xlabel="subscribers", yscale="log", ylabel="µs")
    for ax in (left, mid, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_chat(results: list[dict[str, Any]], path: Path) -> None:
    """Latency percentiles against load (posts/s), one line per target and percentile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, target in enumerate(dict.fromkeys(r["target"] for r in results)):
        rows = sorted((r for r in results if r["target"] == target), key=lambda r: r["posts_per_s"])
        xs = [r["posts_per_s"] for r in rows]
        for key, style in (("latency_ms_p50", "--"), ("latency_ms_p99", "-")):
            ax.plot(
                xs,
                [r[key] for r in rows],
                style,
                color=f"C{n}",
                marker="o",
                label=f"{target} {key[-3:]}",
            )
    ax.set(
        title="chat: publish -> deliver latency vs load (lower is better)",
        xlabel="posts/s (each to every member of a 10-person room)",
        ylabel="ms",
        yscale="log",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
