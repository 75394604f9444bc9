"""Fault scenario `bad-input`: generated hostile frames (`hostile.py`) over many connections
against one embedded node. The node must stay up with bounded memory, answer only documented
error and close codes, and keep answering a canary's pings (measured in its own process)
quickly. A scenario's `ok` is its own verdict; the figures are in `extra`.

The resource attacks on the same kind of node (`conn-flood`, `slowloris`, `never-reads`) are in
`exhaustion.py`; the node is `embedded.py`, the client that can send anything `wireclient.py`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

from realtime_safety.protocol import ERROR_CODES

from ..support import pct
from .embedded import EmbeddedNode, RssSampler
from .hostile import DOCUMENTED_CLOSES, PROTOS, Hostile, RandomChooser, hostile_frame
from .report import FaultResult, Scenario
from .wireclient import Closed, WireClient


@dataclass
class Tally:
    frames: int = 0
    replies: int = 0
    ok_replies: int = 0
    connections: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0

    def violation(self, h: Hostile, what: str) -> None:
        self.violation_count += 1
        if len(self.violations) < 20:
            self.violations.append(f"{h.kind} on {h.proto}: {what}; frame {h.payload[:120]!r}")


async def _exchange(client: WireClient, h: Hostile, tally: Tally, timeout: float) -> bool:
    """Send one hostile frame and judge the answer; False once the connection is closed."""
    tally.frames += 1
    tally.kinds[h.kind] += 1
    try:
        client.send(h.payload, text=h.text)
        while True:
            frame = await client.next_frame(timeout)
            try:
                reply = client.decode(frame)
            except Exception as exc:
                tally.violation(h, f"undecodable reply {frame.data[:80]!r}: {exc}")
                continue
            if not ("ok" in reply and "id" in reply) and reply.get("push") != "error":
                continue  # a push for a subscription
            tally.replies += 1
            if reply.get("ok") is True:
                tally.ok_replies += 1
            else:
                code = (reply.get("error") or {}).get("code")
                tally.errors[str(code)] += 1
                if code not in ERROR_CODES:
                    tally.violation(h, f"undocumented error code {code!r}")
                elif code == "internal":
                    tally.violation(h, f"internal error {reply}")
            if not h.must_close:
                return True
    except Closed as closed:
        code = closed.code
        tally.closes["dropped" if code is None else str(code)] += 1
        if code is None or code not in DOCUMENTED_CLOSES:
            tally.violation(h, f"undocumented close {code}")
        elif code not in h.closes:
            tally.violation(h, f"close {code}, expected {sorted(h.closes) or 'no close'}")
        return False
    except TimeoutError:
        tally.violation(h, "no reply and no close within the timeout")
        return False


async def _fuzz_worker(
    node: EmbeddedNode, n: int, frames: int, seed: int, tally: Tally, timeout: float
) -> None:
    rng = random.Random(seed)
    chooser = RandomChooser(rng)
    token = node.token(f"fz{n}")
    sent = 0
    client: WireClient | None = None
    cid = 0
    while sent < frames:
        proto = client.proto.subprotocol if client is not None else rng.choice(PROTOS)
        h = hostile_frame(chooser, str(proto))
        sent += 1
        if not h.authed:
            fresh = await WireClient.open(node.port, h.proto)
            tally.connections += 1
            await _exchange(fresh, h, tally, timeout)
            fresh.close()
            continue
        if client is None:
            client = await WireClient.open(node.port, h.proto)
            tally.connections += 1
            cid += 1
            reply = await client.command({"id": cid, "op": "auth", "token": token}, timeout)
            if not reply.get("ok"):
                tally.violation(h, f"auth refused: {reply}")
        if not await _exchange(client, h, tally, timeout):
            client.close()
            client = None
    if client is not None:
        client.close()


def _canary_main(port: int, token: str, every: float, stop: Any, out: Pipe) -> None:
    """In its own process (so the fuzzing clients' event loop does not delay it): ping every
    `every` seconds until `stop` is set, then send the round trips back."""

    async def run() -> list[float]:
        client = await WireClient.open(port)
        await client.command({"id": 0, "op": "auth", "token": token})
        rtts: list[float] = []
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            await client.command({"id": n, "op": "ping"})
            rtts.append(time.perf_counter() - t0)
            await asyncio.sleep(every)
        client.close()
        return rtts

    try:
        out.send(asyncio.run(run()))
    except Exception as exc:
        out.send(repr(exc))


class Canary:
    def __init__(self, node: EmbeddedNode, every: float = 0.02) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_canary_main,
            args=(node.port, node.token("canary"), every, self.stop, send),
            daemon=True,
        )

    def __enter__(self) -> Canary:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()

    def rtts(self) -> list[float] | str:
        self.stop.set()
        if not self.recv.poll(30):
            return "the canary sent nothing"
        result: list[float] | str = self.recv.recv()
        return result


def bad_input(scale: float, *, workers: int | None = None, seed: int = 12) -> FaultResult:
    total = max(50, int(100_000 * scale))
    workers = workers or max(4, min(50, int(50 * scale**0.5)))
    result = FaultResult(
        "bad-input", f"{total:,} generated hostile frames on {workers} connections at a time"
    )
    # Rate limits high enough that the frames reach the parsers and handlers.
    with EmbeddedNode(RT_RATE_PER_S="2000", RT_RATE_BURST="2000") as node:
        tally = Tally()

        async def main() -> tuple[list[float] | str, dict[str, float], float]:
            await asyncio.sleep(0.5)  # the node settles before the start figure
            with RssSampler(node) as rss, Canary(node) as canary:
                await asyncio.sleep(1.0)  # the canary connects
                t0 = time.monotonic()
                share = [total // workers + (i < total % workers) for i in range(workers)]
                await asyncio.gather(
                    *(
                        _fuzz_worker(node, i, share[i], seed * 1000 + i, tally, 10.0)
                        for i in range(workers)
                    )
                )
                elapsed = time.monotonic() - t0
                rtts = canary.rtts()
                # Everything closed: memory should come back down.
                await asyncio.sleep(2.0)
            return rtts, rss.figures(), elapsed

        rtts, rss, elapsed = asyncio.run(main())
        alive = node.alive()
        result.sent = tally.frames
        result.acked = tally.replies
        result.extra = {
            "seconds": round(elapsed, 1),
            "frames_per_s": round(tally.frames / elapsed),
            "connections": tally.connections,
            **rss,
            "error_codes": dict(sorted(tally.errors.items())),
            "close_codes": dict(sorted(tally.closes.items())),
            "violations": tally.violation_count,
            "node_alive": alive,
        }
        if isinstance(rtts, str):
            result.notes = f"canary failed: {rtts}. "
            result.ok = False
        else:
            result.extra["canary_pings"] = len(rtts)
            result.extra["canary_p50_ms"] = pct(rtts, 50)
            result.extra["canary_p99_ms"] = pct(rtts, 99)
            result.ok = pct(rtts, 99) < 100
        result.ok = (
            result.ok
            and alive
            and tally.violation_count == 0
            and tally.frames == total
            and rss["rss_peak_mb"] - rss["rss_start_mb"] < 200
        )
        result.notes += "; ".join(tally.violations[:5])
        result.extra["kinds"] = dict(sorted(tally.kinds.items()))
    return result


SCENARIOS: dict[str, Scenario] = {
    "bad-input": Scenario(
        "100k generated hostile frames (types, nesting, UTF-8, msgpack, sizes, ops) on one node",
        bad_input,
    ),
}
