"""The servers the benchmarks compare and how to talk to each: ours, the python-socketio +
Redis peer, and the raw `websockets` ceiling. `Servers` starts one (with what it needs:
Redis, MongoDB) on loopback ports and stops everything on exit.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

import jwt
from websockets.typing import Subprotocol

from .support import free_port, proc_stats, redis_command, secantus_command, wait_port

ROOM = "bench"  # ours: the channel public:bench


class Conn(Protocol):
    """What a target's handshake needs from a client socket."""

    async def send(self, data: str) -> None: ...

    async def recv(self) -> str | bytes: ...


class Target:
    name = ""
    cwd: Path | None = None  # where its server runs (default: here)
    acks = True  # publishes are acknowledged: the publisher waits for every ack
    echo = True  # a publisher subscribed to its room receives its own message

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def token(self, user: str) -> str:
        return jwt.encode({"sub": user, "exp": time.time() + 3600}, self.secret, algorithm="HS256")

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def url(self, port: int) -> str:
        raise NotImplementedError

    async def subscribe(self, ws: Conn, i: int, room: str = ROOM) -> None:
        raise NotImplementedError

    async def publisher(self, ws: Conn) -> None:
        return None

    def publish_frame(self, n: int, ts: float, room: str = ROOM) -> str:
        """A publish carrying `ts=<send time>` in its text; `n` numbers it per connection."""
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
            "realtime_safety.realtime",
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

    async def subscribe(self, ws: Conn, i: int, room: str = ROOM) -> None:
        await self._auth(ws, f"s{i}")
        await ws.send(json.dumps({"id": 2, "op": "subscribe", "channel": f"public:{room}"}))
        await ws.recv()

    async def publisher(self, ws: Conn) -> None:
        await self._auth(ws, "publisher")

    def publish_frame(self, n: int, ts: float, room: str = ROOM) -> str:
        return json.dumps(
            {
                "id": n + 10,
                "op": "publish",
                "channel": f"public:{room}",
                "client_msg_id": f"b{n}",
                "body": {"v": 1, "alg": "none", "text": f"ts={ts!r}"},
            }
        )

    def is_ack(self, data: bytes) -> bool:
        return data.startswith(b'{"id":')


def uvicorn_peer(python: str, app: str, port: int) -> list[str]:
    """A peer's ASGI app on uvicorn. Its keepalive is generous: saturated, a peer's event loop
    answers pings late and would otherwise drop the publisher's connection with the publishes
    it has not read yet."""
    return [
        python,
        "-m",
        "uvicorn",
        app,
        "--port",
        str(port),
        "--log-level",
        "error",
        "--ws",
        "websockets",
        "--ws-ping-timeout",
        "300",
    ]


class SocketIO(Target):
    name = "python-socketio+redis"
    echo = False  # emit(..., skip_sid=sender)

    def command(self, port: int) -> list[str]:
        return uvicorn_peer(
            sys.executable, "realtime_safety.loadtests.peers.socketio_server:app", port
        )

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"

    async def _open(self, ws: Conn) -> None:
        await ws.recv()  # engine.io open packet "0{...}"
        await ws.send("40")  # socket.io connect to "/"
        await ws.recv()  # "40{sid}"

    async def subscribe(self, ws: Conn, i: int, room: str = ROOM) -> None:
        await self._open(ws)
        await ws.send("420" + json.dumps(["join", room]))
        while not str(await ws.recv()).startswith("430"):
            pass

    async def publisher(self, ws: Conn) -> None:
        await self._open(ws)

    def publish_frame(self, n: int, ts: float, room: str = ROOM) -> str:
        # with an ack id (42<id>[...]): the server answers 43<id>[true] once it has emitted
        return f"42{n + 10}" + json.dumps(["publish", {"room": room, "text": f"ts={ts!r}"}])

    def reply_to(self, data: bytes) -> bytes | None:
        return b"3" if data == b"2" else None  # engine.io v4: the server pings, we pong

    def is_ack(self, data: bytes) -> bool:
        return data.startswith(b"43")


class Raw(Target):
    name = "raw websockets (ceiling)"
    acks = False

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "realtime_safety.loadtests.peers.raw_server", str(port)]

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}"

    async def subscribe(self, ws: Conn, i: int, room: str = ROOM) -> None:
        await ws.send(f"sub {room}")

    async def publisher(self, ws: Conn) -> None:
        return None

    def publish_frame(self, n: int, ts: float, room: str = ROOM) -> str:
        return f"pub {room} ts={ts!r}"


DJANGO_PEER = Path(__file__).parent / "peers" / "django_peer"


def django_python() -> str:
    """The Django Channels peer's interpreter, in its own virtualenv (Django Channels' package
    is named `channels`, like ours), created on first use from the pinned requirements."""
    venv = Path(__file__).resolve().parent.parent / ".venv-django-peer"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        requirements = str(DJANGO_PEER / "requirements.txt")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", requirements], check=True)
    return str(python)


class DjangoChannels(Target):
    name = "django-channels+redis"
    echo = False  # the consumer skips the sender
    cwd: Path | None = DJANGO_PEER  # run from its folder: `channels` must be Django's

    def command(self, port: int) -> list[str]:
        return uvicorn_peer(django_python(), "asgi:application", port)

    def url(self, port: int) -> str:
        return f"ws://127.0.0.1:{port}/ws/"

    async def subscribe(self, ws: Conn, i: int, room: str = ROOM) -> None:
        await ws.send(json.dumps({"op": "join", "room": room}))
        while not str(await ws.recv()).startswith('{"joined"'):
            pass

    def publish_frame(self, n: int, ts: float, room: str = ROOM) -> str:
        return json.dumps({"op": "pub", "room": room, "id": n, "text": f"ts={ts!r}"})

    def is_ack(self, data: bytes) -> bool:
        return data.startswith(b'{"ack"')


TARGETS: dict[str, type[Target]] = {
    "realtime": Ours,
    "socketio": SocketIO,
    "django": DjangoChannels,
    "raw": Raw,
}


def subprotocols(kind: str) -> list[Subprotocol] | None:
    return [Subprotocol("rt.v1.json")] if kind == "realtime" else None


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

    def _spawn(
        self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{Path(cmd[0]).name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
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
        if self.kind in ("socketio", "django") or self.topology == "redis":
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
                self._spawn(secantus_command(mongo_port, str(self.work / "mongo")))
                wait_port(mongo_port)
                env["RT_MONGODB_URI"] = f"mongodb://127.0.0.1:{mongo_port}/?directConnection=true"
        target = TARGETS[self.kind](self.secret)
        for n, port in enumerate(self.ports):
            node_env = {**env, "RT_NODE_ID": f"n{n}"}
            self.pids.append(self._spawn(target.command(port), node_env, target.cwd).pid)
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
