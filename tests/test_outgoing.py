"""A connection's outgoing path, step by step: straight to a writable socket, queued behind a
full one, and never one overtaking the other. (The same path under real sockets is covered
by the slow-reader tests in test_protocol.py; this pins the ordering rule deterministically.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from wire import RecordingSocket as Socket
from wire import until

from realtime_safety.protocol import JSON, Frame, wire_frame
from realtime_safety.realtime.config import Limits
from realtime_safety.realtime.connection import Connection
from realtime_safety.realtime.features import UrgentOps
from realtime_safety.realtime.metrics import NodeMetrics


def connection(sock: Socket, queue: int = 8) -> Connection:
    node = SimpleNamespace(
        settings=SimpleNamespace(limits=Limits(send_queue_frames=queue)),
        metrics=NodeMetrics(),
        ops={},
        sheddable=frozenset(),
        urgent=UrgentOps([], frozenset()),
        load=None,
    )
    return Connection(sock, node, JSON)  # type: ignore[arg-type]


async def test_nothing_overtakes_a_queued_frame() -> None:
    sock = Socket()
    conn = connection(sock)
    conn.send({"n": 1})  # writable: straight out, pre-framed
    assert sock.out == [("direct", wire_frame('{"n":1}', binary=False))]
    sock.writable = False
    conn.send({"n": 2})  # the buffer is full: queued, the flusher waits for the drain
    await asyncio.sleep(0)  # a step, not a wait: the flusher may start (either way is valid)
    sock.writable = True  # writable again, but frame 2 has not left yet
    conn.push(Frame({"n": 3}))
    conn.send({"n": 4})
    assert sock.texts() == [1]
    sock.drained.set()
    await until(lambda: len(sock.out) == 4 and conn._outbox._flusher is None, 5, interval=0)
    assert sock.texts() == [1, 2, 3, 4]
    conn.send({"n": 5})  # the queue is empty again: straight out
    assert sock.out[-1][0] == "direct" and sock.texts() == [1, 2, 3, 4, 5]


async def test_queue_over_its_bound_closes_4008() -> None:
    sock = Socket()
    conn = connection(sock, queue=3)
    sock.writable = False
    for n in range(4):
        conn.send({"n": n})
    assert conn._close_code == 4008
    assert conn.node.metrics.slow_consumers == 1
    conn.send({"n": 99})  # closing: dropped, not queued
    assert conn.queued == 3
    assert conn._closer is not None and conn._outbox._flusher is not None
    conn._closer.cancel()
    conn._outbox._flusher.cancel()


async def test_socket_lost_while_frames_wait_drops_the_queue() -> None:
    """The flusher meets a dead socket: it stops, the queue goes (the connection's handler
    ends on the disconnect), and nothing is left running."""
    sock = Socket()
    conn = connection(sock)
    sock.writable = False
    for n in range(3):
        conn.send({"n": n})
    sock.gone = True
    sock.drained.set()
    await until(lambda: conn._outbox._flusher is None, 5, interval=0)
    assert sock.out == [] and conn.queued == 0
    assert conn._close_code is None  # no close frame to a dead socket from here
