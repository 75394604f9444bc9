"""Fault scenarios: hostile input and resource attacks against one embedded node.

- `bad-input`: generated hostile frames (`hostile.py`) over many connections; the node must stay
  up with bounded memory, answer only documented error and close codes, and keep answering a
  canary's pings (measured in its own process) quickly.
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
import contextlib
import json
import multiprocessing
import os
import random
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import jwt
import msgpack
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from realtime_safety.protocol import ERROR_CODES

from ..support import free_port, pct, proc_stats, stalled_subscriber, wait_port
from .hostile import DOCUMENTED_CLOSES, JSON_PROTO, PROTOS, Hostile, RandomChooser, hostile_frame
from .report import FaultResult, Scenario

MB = 1024 * 1024


# --- one node ----------------------------------------------------------------------------


class EmbeddedNode:
    """A `realtime serve` process on the embedded store, killed on exit."""

    def __init__(self, **env: str) -> None:
        self.secret = secrets.token_hex(32)
        self.work = Path(tempfile.mkdtemp(prefix="rt-faults-"))
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RT_")},
            "RT_JWT_SECRET": self.secret,
            "RT_DATA_DIR": str(self.work),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EmbeddedNode:
        log = open(self.work / "node.log", "wb")
        cmd = [sys.executable, "-m", "realtime_safety.realtime", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level", "warning"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        return proc_stats(self.pid)[1]

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return (self.work / "node.log").read_text(errors="replace")

    def token(self, user: str, ttl: float = 3600) -> str:
        claims = {"sub": user, "roles": ["user"], "exp": time.time() + ttl}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


class RssSampler:
    """The node's RSS every `every` seconds, on the event loop, until stopped."""

    def __init__(self, node: EmbeddedNode, every: float = 0.2) -> None:
        self.node, self.every = node, every
        self.samples: list[int] = []
        self.files: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while self.node.alive():
            self.samples.append(self.node.rss())
            self.files.append(self.node.open_files())
            await asyncio.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self.samples.append(self.node.rss())
        self.files.append(self.node.open_files())
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.node.alive():
            self.samples.append(self.node.rss())

    def figures(self) -> dict[str, float]:
        return {
            "rss_start_mb": round(self.samples[0] / MB, 1),
            "rss_peak_mb": round(max(self.samples) / MB, 1),
            "rss_end_mb": round(self.samples[-1] / MB, 1),
        }


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def until(predicate: Any, timeout: float, every: float = 0.05) -> bool:
    """Wait for a condition (polled), at most `timeout` seconds; whether it came true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True


# --- a client that can send anything -----------------------------------------------------


class Closed(Exception):
    """The server closed: `code` is its close code, None when the TCP connection just ended."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code


class WireClient:
    """A WebSocket client on websockets' sans-I/O protocol: it sends any bytes as a text or
    binary frame (invalid UTF-8, oversize) and reports the server's close code."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: ClientProtocol
    ) -> None:
        self.reader, self.writer, self.proto = reader, writer, proto
        self.binary = proto.subprotocol == "rt.v1.msgpack"
        self._events: list[Frame] = []
        self.close_code: int | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int, subprotocol: str = JSON_PROTO) -> WireClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        proto = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/ws"),
            subprotocols=[Subprotocol(subprotocol)],
            max_size=None,
        )
        proto.send_request(proto.connect())
        writer.write(b"".join(proto.data_to_send()))
        client = cls(reader, writer, proto)
        while proto.state is State.CONNECTING:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            proto.receive_data(data)
        if proto.handshake_exc is not None:
            raise proto.handshake_exc
        client.binary = proto.subprotocol == "rt.v1.msgpack"
        client._collect()
        return client

    def _collect(self) -> None:
        for event in self.proto.events_received():
            if isinstance(event, Frame):
                self._events.append(event)
        out = self.proto.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(b"".join(out))  # pongs, the close reply

    def send(self, payload: bytes, *, text: bool) -> None:
        if self.proto.state is not State.OPEN:
            raise Closed(self.close_code)
        if text:
            self.proto.send_text(payload)
        else:
            self.proto.send_binary(payload)
        self.writer.write(b"".join(self.proto.data_to_send()))

    def send_frame(self, frame: dict[str, Any]) -> None:
        if self.binary:
            self.send(msgpack.packb(frame, use_bin_type=True), text=False)
        else:
            self.send(json.dumps(frame).encode(), text=True)

    async def next_frame(self, timeout: float) -> Frame:
        """The next text or binary frame; `Closed` when the connection ended instead."""
        async with asyncio.timeout(timeout):
            while True:
                while self._events:
                    event = self._events.pop(0)
                    if event.opcode is Opcode.CLOSE:
                        self.close_code = Close.parse(event.data).code if event.data else 1005
                        self.closed = True
                        raise Closed(self.close_code)
                    if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                        return event
                if self.closed:
                    raise Closed(self.close_code)
                try:
                    data = await self.reader.read(1 << 20)
                except ConnectionError:
                    data = b""
                if not data:
                    self.closed = True
                    raise Closed(self.close_code)
                self.proto.receive_data(data)
                self._collect()

    def decode(self, frame: Frame) -> dict[str, Any]:
        """A server frame, strictly: UTF-8 and JSON without NaN/Infinity, or msgpack."""
        if frame.opcode is Opcode.BINARY:
            obj = msgpack.unpackb(frame.data, raw=False, strict_map_key=False)
        else:
            obj = json.loads(bytes(frame.data).decode("utf-8"), parse_constant=_no_constant)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        return obj

    async def command(self, frame: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send a command, return its reply (pushes before it are skipped)."""
        self.send_frame(frame)
        while True:
            reply = self.decode(await self.next_frame(timeout))
            if reply.get("id") == frame["id"] and "ok" in reply:
                return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proto.state is State.OPEN:
                self.proto.send_close(1000)
                self.writer.write(b"".join(self.proto.data_to_send()))
        self.writer.close()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} in a reply")


# --- bad-input ---------------------------------------------------------------------------


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


# --- conn-flood --------------------------------------------------------------------------


def conn_flood(scale: float, *, limit: int = 50) -> FaultResult:
    attempts = max(limit + 20, int(2000 * scale))
    result = FaultResult("conn-flood", f"one user opens {attempts:,} connections (limit {limit})")
    _raise_file_limit()
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
    _raise_file_limit()
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
    _raise_file_limit()
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
            base_files = node.open_files()
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
                # The readers are gone from the node once its open files are back.
                gone = await until(lambda: node.open_files() <= base_files, 4 * ping_s + 30, 0.1)
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
    "bad-input": Scenario(
        "100k generated hostile frames (types, nesting, UTF-8, msgpack, sizes, ops) on one node",
        bad_input,
    ),
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
