"""What every benchmark needs: free loopback ports, waiting for a server, percentiles, and
a process's CPU and memory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile of durations in seconds, in milliseconds."""
    if not values:
        return float("nan")
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000, 2)


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def secantus_command(port: int, storage: str) -> list[str]:
    """SecantusDB, the local wire-compatible MongoDB stand-in, on a loopback port."""
    exe = shutil.which("secantusd-py") or str(Path(sys.executable).parent / "secantusd-py")
    return [
        exe,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--storage-path",
        storage,
        "--standalone",
    ]


def redis_command(port: int, directory: str) -> list[str]:
    """A throw-away redis-server on a loopback port: no persistence."""
    exe = shutil.which("redis-server") or "redis-server"
    return [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        directory,
        "--protected-mode",
        "no",
    ]


def stalled_subscriber(
    port: int, token: str, channel: str, *, rcvbuf: int = 16 * 1024
) -> tuple[socket.socket, ClientProtocol]:
    """A client that authenticates, subscribes and then never reads again, on a socket with a
    small receive buffer: the slow phone on a bad network, with nothing in between."""
    proto = ClientProtocol(
        parse_uri(f"ws://127.0.0.1:{port}/ws"), subprotocols=[Subprotocol("rt.v1.json")]
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    proto.send_request(proto.connect())
    sock.sendall(b"".join(proto.data_to_send()))
    while proto.state is not State.OPEN:
        proto.receive_data(sock.recv(65536))
        if proto.handshake_exc is not None:
            raise proto.handshake_exc
    proto.send_text(json.dumps({"id": 1, "op": "auth", "token": token}).encode())
    proto.send_text(json.dumps({"id": 2, "op": "subscribe", "channel": channel}).encode())
    sock.sendall(b"".join(proto.data_to_send()))
    replies = 0
    while replies < 2:
        proto.receive_data(sock.recv(65536))
        for event in proto.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                frame = json.loads(bytes(event.data))
                if "id" not in frame:
                    continue  # a push (another member's join) before the replies
                if not frame["ok"]:
                    raise RuntimeError(f"refused: {frame!r}")
                replies += 1
    return sock, proto
