"""Fault scenarios: resource attacks against one embedded node (`embedded.py`).

- `conn-flood`: one user opens thousands of connections; past `RT_MAX_CONNECTIONS_PER_USER`
  they are refused (`too_large`, close 4008) and others are not affected.
- `slowloris`: TCP connections that send nothing, half an upgrade request, or an upgrade and
  then nothing; they are closed by `RT_HANDSHAKE_TIMEOUT_S` / `RT_AUTH_TIMEOUT_S`.
- `never-reads`: subscribers that never read while messages pour in; they get 4008 (queue
  full), 1011 (no pong in time) or are dropped, and the node's memory and open files come back.

A scenario's `ok` is its own verdict; the figures are in `extra`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from ..support import stalled_subscriber
from .embedded import EmbeddedNode, RssSampler, raise_file_limit, until
from .report import FaultResult, Scenario
from .wireclient import Closed, WireClient

# --- conn-flood --------------------------------------------------------------------------


def conn_flood(scale: float, *, limit: int = 50) -> FaultResult:
    attempts = max(limit + 20, int(2000 * scale))
    result = FaultResult("conn-flood", f"one user opens {attempts:,} connections (limit {limit})")
    raise_file_limit()
    with EmbeddedNode(RT_MAX_CONNECTIONS_PER_USER=str(limit)) as node:
        token = node.token("flooder")

        async def one(i: int, held: list[WireClient], outcome: Counter[str]) -> None:
            try:
                client = await WireClient.open(node.port)
                reply = await client.command({"id": 1, "op": "auth", "token": token})
            except (OSError, Closed, TimeoutError) as exc:
                outcome[f"failed: {type(exc).__name__}"] += 1
                return
            if reply.get("ok"):
                outcome["accepted"] += 1
                held.append(client)
                return
            outcome[f"refused {reply['error']['code']}"] += 1
            try:
                await client.next_frame(10)
                outcome["no close"] += 1
            except Closed as closed:
                outcome[f"close {closed.code}"] += 1
            except TimeoutError:
                outcome["no close"] += 1
            client.close()

        async def main() -> dict[str, Any]:
            figures: dict[str, Any] = {}
            held: list[WireClient] = []
            outcome: Counter[str] = Counter()
            with RssSampler(node) as rss:
                t0 = time.monotonic()
                sem = asyncio.Semaphore(200)

                async def bounded(i: int) -> None:
                    async with sem:
                        await one(i, held, outcome)

                await asyncio.gather(*(bounded(i) for i in range(attempts)))
                figures["seconds"] = round(time.monotonic() - t0, 1)
                # Another user is not affected, and the flooder's held ones still work.
                other = await WireClient.open(node.port)
                other_ok = (await other.command({"id": 1, "op": "auth", "token": node.token("x")}))[
                    "ok"
                ]
                t1 = time.perf_counter()
                await other.command({"id": 2, "op": "ping"})
                figures["other_user_ping_ms"] = round((time.perf_counter() - t1) * 1000, 2)
                other.close()
                held_ok = all([(await c.command({"id": 2, "op": "ping"}))["ok"] for c in held[:5]])
                # Once the flooder lets go, it may connect again.
                for c in held:
                    c.close()
                files_before = node.open_files()
                again = False
                for _ in range(100):
                    c = await WireClient.open(node.port)
                    r = await c.command({"id": 1, "op": "auth", "token": token})
                    c.close()
                    if r.get("ok"):
                        again = True
                        break
                    await asyncio.sleep(0.05)
            figures.update(
                outcome=dict(sorted(outcome.items())),
                accepted=outcome["accepted"],
                other_user_ok=other_ok,
                held_still_work=held_ok,
                reconnect_after_release=again,
                open_files_at_peak=files_before,
                **rss.figures(),
            )
            return figures

        figures = asyncio.run(main())
        result.sent = attempts
        result.acked = figures["accepted"]
        result.extra = figures
        refused = attempts - figures["accepted"]
        result.ok = (
            node.alive()
            and figures["accepted"] == limit
            and figures["outcome"].get("refused too_large", 0) == refused
            and figures["outcome"].get("close 4008", 0) == refused
            and figures["other_user_ok"]
            and figures["held_still_work"]
            and figures["reconnect_after_release"]
        )
    return result


# --- slowloris ---------------------------------------------------------------------------


def slowloris(scale: float, *, handshake_s: float = 10.0, auth_s: float = 10.0) -> FaultResult:
    per_group = max(5, int(300 * scale))
    result = FaultResult(
        "slowloris",
        f"{3 * per_group} sockets: silent, half an upgrade (trickled), upgraded but no auth",
    )
    raise_file_limit()
    with EmbeddedNode(
        RT_HANDSHAKE_TIMEOUT_S=str(handshake_s), RT_AUTH_TIMEOUT_S=str(auth_s)
    ) as node:

        async def hold(kind: str, dropped: dict[str, list[float]], codes: Counter[str]) -> None:
            t0 = time.monotonic()
            if kind == "upgraded":
                client = await WireClient.open(node.port)
                try:
                    await client.next_frame(handshake_s + auth_s + 30)
                    codes["frame"] += 1
                except Closed as closed:
                    codes[f"close {closed.code}"] += 1
                except TimeoutError:
                    codes["held"] += 1
                    client.close()
                    return
                dropped[kind].append(time.monotonic() - t0)
                client.close()
                return
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            lines = [
                b"GET /ws HTTP/1.1\r\n",
                b"Host: 127.0.0.1\r\n",
                b"Upgrade: websocket\r\n",
                b"Connection: Upgrade\r\n",
                b"Sec-WebSocket-Version: 13\r\n",
            ] + [b"X-Pad-%d: 1\r\n" % i for i in range(1000)]  # never the final CRLF
            sent = 0
            try:
                while time.monotonic() < t0 + handshake_s + 30:
                    if kind == "partial" and sent < len(lines):
                        writer.write(lines[sent])  # one header line a second
                        sent += 1
                    try:
                        got = await asyncio.wait_for(reader.read(1), 1.0)
                    except TimeoutError:
                        continue
                    codes["closed" if got == b"" else "answered"] += 1
                    dropped[kind].append(time.monotonic() - t0)
                    return
                codes["held"] += 1
            except ConnectionError:
                codes["reset"] += 1
                dropped[kind].append(time.monotonic() - t0)
            finally:
                writer.close()

        async def main() -> dict[str, Any]:
            dropped: dict[str, list[float]] = {"silent": [], "partial": [], "upgraded": []}
            codes: Counter[str] = Counter()
            base = node.open_files()
            with RssSampler(node, 0.05) as rss:
                tasks = [
                    asyncio.create_task(hold(kind, dropped, codes))
                    for kind in ("silent", "partial", "upgraded")
                    for _ in range(per_group)
                ]
                await until(lambda: len(codes) > 0 or max(rss.files) >= base + 3 * per_group, 20)
                # While they are held, a real client gets through.
                t1 = time.perf_counter()
                c = await WireClient.open(node.port)
                ok = (await c.command({"id": 1, "op": "auth", "token": node.token("u")}))["ok"]
                served_ms = round((time.perf_counter() - t1) * 1000, 1)
                c.close()
                await asyncio.gather(*tasks)
                back = await until(lambda: node.open_files() <= base + 1, 15)
            return {
                "held_at_peak": max(rss.files) - base,
                "real_client_ok": ok,
                "real_client_ms": served_ms,
                "outcome": dict(sorted(codes.items())),
                **{
                    f"{k}_dropped_after_s": (f"{min(v):.1f}-{max(v):.1f}" if v else "none")
                    for k, v in dropped.items()
                },
                "dropped": sum(len(v) for v in dropped.values()),
                "open_files_back": back,
                **rss.figures(),
            }

        figures = asyncio.run(main())
        result.sent = 3 * per_group
        result.extra = {"handshake_timeout_s": handshake_s, "auth_timeout_s": auth_s, **figures}
        result.ok = (
            node.alive()
            and figures["dropped"] == 3 * per_group
            and figures["real_client_ok"]
            and figures["open_files_back"]
            and figures["outcome"].get("close 4001", 0) == per_group
        )
    return result


# --- never-reads -------------------------------------------------------------------------


def _drain(sock: socket.socket) -> str:
    """Read what the server left for a stalled client: its close code, or how it ended."""
    proto = ClientProtocol(parse_uri("ws://x/ws"), state=State.OPEN, max_size=None)
    sock.settimeout(5)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return "dropped"
            proto.receive_data(data)
            for e in proto.events_received():
                if isinstance(e, Frame) and e.opcode is Opcode.CLOSE:
                    return f"close {Close.parse(e.data).code}"
    except ConnectionResetError:
        return "dropped"
    except TimeoutError:
        # Nothing more arrives: the node dropped the socket and its kernel gave up on the
        # orphaned rest (the node's open files say whether it still holds it).
        return "silent"
    finally:
        sock.close()


def never_reads(scale: float, *, ping_s: float = 5.0) -> FaultResult:
    readers = max(3, int(100 * scale))
    messages = max(300, int(3000 * scale))
    result = FaultResult(
        "never-reads",
        f"{readers} subscribers never read while {messages} messages of 4 KB are published",
    )
    raise_file_limit()
    env = {
        "RT_PING_INTERVAL_S": str(ping_s),
        "RT_PING_TIMEOUT_S": str(ping_s),
        "RT_SEND_QUEUE_FRAMES": "256",
        "RT_RATE_PER_S": "100000",
        "RT_RATE_BURST": "100000",
    }
    with EmbeddedNode(**env) as node:
        channel = "public:flood"

        async def main() -> dict[str, Any]:
            base_sockets = node.open_sockets()
            with RssSampler(node) as rss:
                stalled = await asyncio.gather(
                    *(
                        asyncio.to_thread(
                            stalled_subscriber, node.port, node.token(f"r{i}"), channel, rcvbuf=8192
                        )
                        for i in range(readers)
                    )
                )
                socks = [sock for sock, _ in stalled]
                pub = await WireClient.open(node.port)
                await pub.command({"id": 0, "op": "auth", "token": node.token("pub")})
                text = "x" * 4096
                t0 = time.monotonic()
                for n in range(1, messages + 1):
                    frame = {
                        "id": n,
                        "op": "publish",
                        "channel": channel,
                        "client_msg_id": f"m{n}",
                        "body": {"v": 1, "alg": "none", "text": text},
                    }
                    reply = await pub.command(frame)
                    assert reply["ok"], reply
                published_s = time.monotonic() - t0
                pub.close()  # (a client that stops reading is what this scenario is about)
                # The readers are gone from the node once its sockets are back to the start.
                wait_s = 4 * ping_s + 30
                gone = await until(lambda: node.open_sockets() <= base_sockets, wait_s, 0.1)
                left = node.open_sockets() - base_sockets
                gone_s = time.monotonic() - t0 - published_s
                t1 = time.perf_counter()
                after = await WireClient.open(node.port)
                await after.command({"id": 1, "op": "auth", "token": node.token("after")})
                ping_ms = (time.perf_counter() - t1) * 1000
                after.close()
            ends = Counter(await asyncio.gather(*(asyncio.to_thread(_drain, s) for s in socks)))
            return {
                "published_s": round(published_s, 1),
                "readers_gone": gone,
                "sockets_left": left,
                "gone_after_publishing_s": round(gone_s, 1),
                "reader_ends": dict(sorted(ends.items())),
                "new_client_auth_ms": round(ping_ms, 2),
                **rss.figures(),
            }

        figures = asyncio.run(main())
        result.sent = messages
        result.acked = messages
        result.extra = {"ping_interval_s": ping_s, "ping_timeout_s": ping_s, **figures}
        ends = figures["reader_ends"]
        result.ok = (
            node.alive()
            and figures["readers_gone"]
            and set(ends) <= {"close 4008", "close 1011", "dropped", "silent"}
            and figures["rss_end_mb"] - figures["rss_start_mb"] < 100
        )
    return result


SCENARIOS: dict[str, Scenario] = {
    "conn-flood": Scenario(
        "one user opens thousands of connections: the per-user limit refuses them", conn_flood
    ),
    "slowloris": Scenario(
        "silent sockets, half-sent upgrades, upgraded but never authenticated", slowloris
    ),
    "never-reads": Scenario(
        "subscribers that never read: 4008 or dropped, memory and files come back", never_reads
    ),
}
