"""Side-by-side benchmarks on one machine: our server, the python-socketio + Redis peer, and
the raw `websockets` broadcast ceiling, driven by the same client code.

    python -m loadtests compare --subscribers 1000,5000 --messages 100 --rate 100
    python -m loadtests idle --connections 5000

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
import collections
import json
import multiprocessing as mp
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from .support import free_port, pct, proc_stats, redis_command, wait_port

CHANNEL = "public:bench"
TS = re.compile(rb"ts=([0-9.]+)")


# --- targets: how to start each server and speak to it --------------------------------


class Conn(Protocol):
    """What a target's handshake needs from a client socket."""

    async def send(self, data: str) -> None: ...

    async def recv(self) -> str | bytes: ...


class Target:
    name = ""
    acks = True  # publishes are acknowledged: the publisher waits for every ack

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def token(self, user: str) -> str:
        return jwt.encode({"sub": user, "exp": time.time() + 3600}, self.secret, algorithm="HS256")

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def url(self, port: int) -> str:
        raise NotImplementedError

    async def subscribe(self, ws: Conn, i: int) -> None:
        raise NotImplementedError

    async def publisher(self, ws: Conn) -> None:
        return None

    def publish_frame(self, n: int, ts: float) -> str:
        raise NotImplementedError

    def reply_to(self, data: bytes) -> bytes | None:
        """A frame the client must answer (keepalive), or None."""
        return None

    def is_ack(self, data: bytes) -> bool:
        """Whether a frame to the publisher acknowledges one publish."""
        return False


class Ours(Target):
    name = "realtime"

    def command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "realtime",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "error",
        ]

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/ws"

    async def _auth(self, ws: Conn, user: str) -> None:
        await ws.send(json.dumps({"id": 1, "op": "auth", "token": self.token(user)}))
        await ws.recv()

    async def subscribe(self, ws: Conn, i: int) -> None:
        await self._auth(ws, f"s{i}")
        await ws.send(json.dumps({"id": 2, "op": "subscribe", "channel": CHANNEL}))
        await ws.recv()

    async def publisher(self, ws: Conn) -> None:
        await self._auth(ws, "publisher")

    def publish_frame(self, n: int, ts: float) -> str:
        return json.dumps(
            {
                "id": n + 10,
                "op": "publish",
                "channel": CHANNEL,
                "client_msg_id": f"b{n}",
                "body": {"v": 1, "alg": "none", "text": f"ts={ts!r}"},
            }
        )

    def is_ack(self, data: bytes) -> bool:
        return data.startswith(b'{"id":')


class SocketIO(Target):
    name = "python-socketio+redis"

    def command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "loadtests.peers.socketio_server:app",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--ws",
            "websockets",
        ]

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"

    async def _open(self, ws: Conn) -> None:
        await ws.recv()  # engine.io open packet "0{...}"
        await ws.send("40")  # socket.io connect to "/"
        await ws.recv()  # "40{sid}"

    async def subscribe(self, ws: Conn, i: int) -> None:
        await self._open(ws)
        await ws.send('420["join","bench"]')
        while not str(await ws.recv()).startswith("430"):
            pass

    async def publisher(self, ws: Conn) -> None:
        await self._open(ws)

    def publish_frame(self, n: int, ts: float) -> str:
        # with an ack id (42<id>[...]): the server answers 43<id>[true] once it has emitted
        return f"42{n + 10}" + json.dumps(["publish", {"room": "bench", "text": f"ts={ts!r}"}])

    def reply_to(self, data: bytes) -> bytes | None:
        return b"3" if data == b"2" else None  # engine.io v4: the server pings, we pong

    def is_ack(self, data: bytes) -> bool:
        return data.startswith(b"43")


class Raw(Target):
    name = "raw websockets (ceiling)"
    acks = False

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "loadtests.peers.raw_server", str(port)]

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}"

    async def subscribe(self, ws: Conn, i: int) -> None:
        await ws.send("sub")

    async def publisher(self, ws: Conn) -> None:
        return None

    def publish_frame(self, n: int, ts: float) -> str:
        return f"ts={ts!r}"


TARGETS: dict[str, type[Target]] = {"realtime": Ours, "socketio": SocketIO, "raw": Raw}


# --- client processes ---------------------------------------------------------------


def _protocols(kind: str) -> list[Subprotocol] | None:
    return [Subprotocol("rt.v1.json")] if kind == "realtime" else None


class _Socket(WSListener):
    """One subscriber socket (picows: frames arrive in a callback, no task per socket).
    During set-up frames go to `inbox` for the target's handshake; then they are counted."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: WSTransport | None = None
        self.counting = False
        self.got = 0
        self.finished = False
        self.closed = False

    # the Conn protocol, for Target.subscribe
    async def send(self, data: str) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, data.encode())

    async def recv(self) -> str:
        return (await self.inbox.get()).decode()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.CLOSE:
            self.closed = True
            self.run.closes[str(frame.get_close_code().value)] += 1
            transport.disconnect()
            return
        if kind != WSMsgType.TEXT and kind != WSMsgType.BINARY:
            return
        payload = frame.get_payload_as_bytes()
        if not self.counting:
            self.inbox.put_nowait(payload)
            return
        answer = self.run.target.reply_to(payload)
        if answer is not None:
            transport.send(WSMsgType.TEXT, answer)
            return
        if b"ts=" not in payload:
            return  # another push (presence, typing): not a benchmark message
        self.got += 1
        self.run.received += 1
        if self.got % 4 == 1:  # sample latency (parsing every frame would cost the client)
            match = TS.search(payload)
            if match:
                self.run.latencies.append(time.time() - float(match.group(1)))
        if self.got >= self.run.expected:
            self._finish()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.finished and not self.closed:
            self.run.closes["dropped"] += 1  # the connection ended without a close frame
        self._finish()

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.run.finished += 1
            if self.run.finished == len(self.run.sockets) and not self.run.done.done():
                self.run.done.set_result(None)


class _Run:
    def __init__(self, target: Target, expected: int) -> None:
        self.target = target
        self.expected = expected
        self.sockets: list[_Socket] = []
        self.received = 0
        self.finished = 0
        self.latencies: list[float] = []
        self.closes: collections.Counter[str] = collections.Counter()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


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
    run = _Run(TARGETS[kind](secret), expected)
    protocols = _protocols(kind)
    headers = {"Sec-WebSocket-Protocol": ", ".join(protocols)} if protocols else {}
    for i in range(first, first + count):
        sock = _Socket(run)
        await ws_connect(lambda s=sock: s, url, extra_headers=headers, max_frame_size=2**24)
        await run.target.subscribe(sock, i)
        sock.counting = True
        run.sockets.append(sock)
    ready.put(count)
    try:
        async with asyncio.timeout(max(0.1, deadline - time.time())):
            await run.done
    except TimeoutError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put(
        {
            "received": run.received,
            "latencies": run.latencies,
            "closes": dict(run.closes),
            "short": sum(1 for sock in run.sockets if sock.got < expected),
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }
    )
    for sock in run.sockets:
        if sock.transport is not None:
            sock.transport.disconnect()


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
    server_rss_mb: float
    server_kb_per_connection: float
    client_cpu_s: float
    duration_s: float
    disconnects: str  # close codes seen by subscribers, e.g. "4008x12"
    incomplete: int  # subscribers still missing messages at the end (0 = all delivered)
    acked: int  # publishes the server acknowledged
    publisher_closed: str  # close code if the server closed the publisher's connection
    nodes: int = 1


class Servers:
    """Starts a target's server (and what it needs: Redis, MongoDB) and stops everything."""

    def __init__(
        self, kind: str, topology: str, extra_env: dict[str, str] | None = None, nodes: int = 1
    ) -> None:
        if nodes > 1 and (kind == "raw" or (kind == "realtime" and topology != "redis")):
            raise ValueError("several nodes need a shared broker: realtime on Redis, or socketio")
        self.kind = kind
        self.extra_env = extra_env or {}
        self.topology = topology
        self.secret = secrets.token_hex(32)
        self.work = Path(tempfile.mkdtemp(prefix="rt-compare-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports = [free_port() for _ in range(nodes)]
        self.port = self.ports[0]
        self.pids: list[int] = []

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{Path(cmd[0]).name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Servers:
        env = {
            **os.environ,
            "RT_JWT_SECRET": self.secret,
            "RT_DATA_DIR": str(self.work),
            "RT_RATE_PER_S": "100000",
            "RT_RATE_BURST": "100000",
            "RT_SEND_QUEUE_FRAMES": "100000",
            **self.extra_env,
        }
        if self.kind == "socketio" or self.topology == "redis":
            redis_port = free_port()
            self._spawn(redis_command(redis_port, str(self.work)))
            wait_port(redis_port)
            env["RT_PEER_REDIS_URL"] = env["RT_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            if self.kind != "realtime":
                env.pop("RT_REDIS_URL")
            elif os.environ.get("MONGODB_URI"):
                env["RT_MONGODB_URI"] = os.environ["MONGODB_URI"]
            else:
                mongo_port = free_port()
                exe = shutil.which("secantusd-py") or str(
                    Path(sys.executable).parent / "secantusd-py"
                )
                self._spawn(
                    [
                        exe,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(mongo_port),
                        "--storage-path",
                        str(self.work / "mongo"),
                        "--standalone",
                    ]
                )
                wait_port(mongo_port)
                env["RT_MONGODB_URI"] = f"mongodb://127.0.0.1:{mongo_port}/?directConnection=true"
        target = TARGETS[self.kind](self.secret)
        for n, port in enumerate(self.ports):
            self.pids.append(self._spawn(target.command(port), {**env, "RT_NODE_ID": f"n{n}"}).pid)
        for port in self.ports:
            wait_port(port)
        return self

    @property
    def pid(self) -> int:
        return self.pids[0]

    def stats(self) -> tuple[float, int]:
        """CPU seconds and RSS bytes of all server nodes together."""
        cpu, rss = 0.0, 0
        for pid in self.pids:
            c, r = proc_stats(pid)
            cpu, rss = cpu + c, rss + r
        return cpu, rss

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


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
        subprotocols=_protocols("realtime" if isinstance(target, Ours) else ""),
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
    """Memory per idle, authenticated, subscribed connection on the server."""
    with Servers(kind, topology) as servers:
        target = TARGETS[kind](servers.secret)
        _, before = proc_stats(servers.pid)

        async def hold() -> int:
            socks = []
            for i in range(connections):
                # Idle clients read nothing (join pushes pile up): unbounded client queue,
                # so their close handshake is not stuck behind it.
                ws = await connect(
                    target.url(servers.port),
                    subprotocols=_protocols(kind),
                    max_queue=None,
                    close_timeout=1,
                )
                await target.subscribe(ws, i)
                socks.append(ws)
            await asyncio.sleep(2)
            _, after = proc_stats(servers.pid)
            for ws in socks:
                await ws.close()
            return after

        after = asyncio.run(hold())
    return {
        "scenario": "idle",
        "target": TARGETS[kind].name,
        "connections": connections,
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
    return table


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for target in dict.fromkeys(r["target"] for r in results):
        rows = [r for r in results if r["target"] == target]
        xs = [r["subscribers"] for r in rows]
        left.plot(xs, [r["delivered_per_s"] for r in rows], marker="o", label=target)
        right.plot(xs, [r["latency_ms_p99"] for r in rows], marker="o", label=target)
    left.set(title="delivered messages/s (higher is better)", xlabel="subscribers")
    right.set(
        title="publish -> deliver p99 ms (lower is better)", xlabel="subscribers", yscale="log"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
