"""The benchmark clients: picows sockets (frames arrive in a callback; no task per socket),
so that one client process holds thousands of connections cheaply and the server, not the
client, is what a run measures. Each socket counts messages carrying `ts=<send time>` and
samples their latency; publishes it sends are timed until their acknowledgement.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from .targets import Target, subprotocols

TS = re.compile(rb"ts=([0-9.]+)")


class Tally:
    """What the sockets of one client process saw. `expected`: benchmark messages all of
    them together should receive; `done` resolves once they have (or every socket is gone)."""

    def __init__(self, target: Target, expected: int, per_socket: int = 0) -> None:
        self.target = target
        self.expected = expected
        self.per_socket = per_socket  # if known: a lost socket no longer counts as expected
        self.sockets: list[BenchSocket] = []
        self.received = 0
        self.refused = 0  # publishes answered with an error (an overloaded node's `unavailable`)
        self.per_refusal = 0  # deliveries a refused publish no longer owes (`expected` drops)
        self.gone = 0
        self.latencies: list[float] = []  # sampled publish -> deliver, seconds
        self.ack_latencies: list[float] = []  # publish -> acknowledgement, seconds
        self.closes: collections.Counter[str] = collections.Counter()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def check(self) -> None:
        if not self.done.done() and (
            self.received >= self.expected or self.gone == len(self.sockets)
        ):
            self.done.set_result(None)

    def disconnect(self) -> None:
        for sock in self.sockets:
            if sock.transport is not None:
                sock.transport.disconnect()

    def incomplete(self) -> int:
        """Sockets that received fewer than `per_socket` messages."""
        return sum(1 for sock in self.sockets if sock.got < self.per_socket)


class BenchSocket(WSListener):
    """One client socket. During set-up its frames go to `inbox` for the target's handshake
    (it is the target's `Conn`); then they are counted."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: WSTransport | None = None
        self.counting = False
        self.got = 0
        self.sent: collections.deque[float] = collections.deque()  # unacknowledged publishes
        self.published = 0
        self.closed = False

    # the Conn protocol, for Target.subscribe
    async def send(self, data: str) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, data.encode())

    async def recv(self) -> str:
        return (await self.inbox.get()).decode()

    def publish(self, room: str) -> None:
        assert self.transport is not None
        now = time.time()
        frame = self.tally.target.publish_frame(self.published, now, room)
        self.published += 1
        if self.tally.target.acks:
            self.sent.append(now)
        self.transport.send(WSMsgType.TEXT, frame.encode())

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.CLOSE:
            self.closed = True
            self.tally.closes[str(frame.get_close_code().value)] += 1
            transport.disconnect()
            return
        if kind != WSMsgType.TEXT and kind != WSMsgType.BINARY:
            return
        payload = frame.get_payload_as_bytes()
        if not self.counting:
            self.inbox.put_nowait(payload)
            return
        tally = self.tally
        answer = tally.target.reply_to(payload)
        if answer is not None:
            transport.send(WSMsgType.TEXT, answer)
            return
        if self.sent and tally.target.is_ack(payload):
            sent = self.sent.popleft()
            if b'"ok":false' in payload[:40]:
                tally.refused += 1
                tally.expected -= tally.per_refusal
                tally.check()
            else:
                tally.ack_latencies.append(time.time() - sent)
            return
        if b"ts=" not in payload:
            return  # another push (presence, typing): not a benchmark message
        self.got += 1
        tally.received += 1
        if self.got % 4 == 1:  # sample latency (parsing every frame would cost the client)
            match = TS.search(payload)
            if match:
                tally.latencies.append(time.time() - float(match.group(1)))
        if tally.received >= tally.expected:
            tally.check()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        tally = self.tally
        if not self.closed and not tally.done.done():
            tally.closes["dropped"] += 1  # the connection ended without a close frame
        tally.gone += 1
        if tally.per_socket:
            tally.expected -= max(0, tally.per_socket - self.got)
        tally.check()


async def open_socket(tally: Tally, url: str, kind: str) -> BenchSocket:
    """Connect (not yet set up: the caller runs the target's handshake on it)."""
    protocols = subprotocols(kind)
    headers = {"Sec-WebSocket-Protocol": ", ".join(protocols)} if protocols else {}
    sock = BenchSocket(tally)
    await ws_connect(lambda: sock, url, extra_headers=headers, max_frame_size=2**24)
    tally.sockets.append(sock)
    return sock
