"""A frame looked at as it arrives (issue 21): while the command loop waits, an SOS starts in
the socket's read callback and chat refused under overload is answered there; neither may
change what the client sees (the reply, its order, the rate limit before the overload)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect
from wire import RecordingSocket as Socket

from realtime_safety.protocol import JSON, Feature, Reply, Session
from realtime_safety.realtime.config import Limits
from realtime_safety.realtime.connection import Connection
from realtime_safety.realtime.features import UrgentOps
from realtime_safety.realtime.metrics import NodeMetrics


class Load:
    """Sheds every sheddable command while `overloaded`, or says yes and no from `answers`."""

    def __init__(self, overloaded: bool, answers: list[bool] | None = None) -> None:
        self.overloaded = overloaded
        self.answers = answers
        self.shed = 0

    def refuse(self) -> bool:
        refuse = self.answers.pop(0) if self.answers is not None else self.overloaded
        self.shed += refuse
        return refuse

    def retry_after_ms(self) -> int:
        return 700


class Sos(Feature):
    shed = frozenset({"publish"})

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.started: list[str] = []
        self.ops = {"alert.trigger": self.trigger, "publish": self.publish}
        self.urgent = {"alert.trigger": self.start}

    async def trigger(self, session: Session, frame: dict[str, Any]) -> Reply:
        self.handled.append("alert.trigger")
        return {"how": "handler"}

    async def publish(self, session: Session, frame: dict[str, Any]) -> Reply:
        self.handled.append("publish")
        return {}

    def start(self, session: Session, frame: dict[str, Any]) -> asyncio.Future[Reply]:
        self.started.append(frame["client_alert_id"])
        done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        done.set_result({"how": "started"})
        return done


BOUNDED: list[str] = []


async def unbounded(what: str, call: Any) -> Any:
    BOUNDED.append(what)  # the store-timeout bound's name (metrics label, error message)
    return await call


def waiting(sock: Socket, feature: Sos, load: Load, burst: int = 10) -> Connection:
    """A connection whose command loop waits for its next frame."""
    node = SimpleNamespace(
        settings=SimpleNamespace(limits=Limits(rate_per_s=0.001, rate_burst=burst)),
        metrics=NodeMetrics(),
        ops=feature.ops,
        sheddable=feature.shed,
        urgent=UrgentOps([feature], feature.shed),
        load=load,
        channels=SimpleNamespace(bounded=unbounded),
    )
    conn = Connection(sock, node, JSON)  # type: ignore[arg-type]
    conn._started = conn._receiving = True
    return conn


def arrival(**frame: Any) -> dict[str, Any]:
    return {"type": "websocket.receive", "text": json.dumps(frame)}


async def run_loop(conn: Connection, *events: dict[str, Any]) -> None:
    """The command loop over these events, then a disconnect."""
    conn._receiving = False
    inbox = [*events, {"type": "websocket.disconnect", "code": 1000}]

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    conn.ws = SimpleNamespace(receive=receive)  # type: ignore[assignment]
    with pytest.raises(WebSocketDisconnect):
        await conn._command_loop()


def replies(sock: Socket) -> list[dict[str, Any]]:
    return [json.loads(wire[2:]) for _, wire in sock.out]


async def test_an_sos_starts_as_it_arrives_and_the_loop_answers_it_once() -> None:
    sock, feature = Socket(), Sos()
    conn = waiting(sock, feature, Load(overloaded=False))
    frame = {"id": 4, "op": "alert.trigger", "client_alert_id": "a1"}
    passed = conn._arrived(arrival(**frame))
    assert feature.started == ["a1"]  # before any await: in the read callback
    assert passed is not None and passed["frame"] == frame
    # the loop then gets the decoded frame and answers with the started call, in order
    await run_loop(conn, passed)
    assert replies(sock) == [{"id": 4, "ok": True, "how": "started"}]
    assert BOUNDED[-1] == "request"  # bounded by the store timeout like any command
    assert feature.handled == []  # not run a second time
    assert conn.node.metrics.frames_in == 1


async def test_a_frame_behind_a_running_command_waits_its_turn() -> None:
    sock, feature = Socket(), Sos()
    conn = waiting(sock, feature, Load(overloaded=True))
    conn._receiving = False  # busy with the previous command: order comes first
    message = arrival(id=1, op="alert.trigger", client_alert_id="a2")
    assert conn._arrived(message) is message
    assert feature.started == [] and sock.out == []


async def test_chat_refused_under_overload_is_answered_at_the_door() -> None:
    sock, feature, load = Socket(), Sos(), Load(overloaded=True)
    conn = waiting(sock, feature, load)
    assert conn._arrived(arrival(id=7, op="publish", channel="public:x")) is None
    assert replies(sock) == [
        {
            "id": 7,
            "ok": False,
            "error": {
                "code": "unavailable",
                "message": "the server is overloaded: retry later",
                "retry_after_ms": 700,
            },
        }
    ]
    assert load.shed == 1 and feature.handled == []
    assert conn.node.metrics.frames_in == 1
    # an SOS is never refused: it starts
    assert conn._arrived(arrival(id=8, op="alert.trigger", client_alert_id="a3")) is not None
    assert feature.started == ["a3"] and len(sock.out) == 1


async def test_the_rate_limit_comes_before_the_overload_at_the_door() -> None:
    sock, feature, load = Socket(), Sos(), Load(overloaded=True)
    conn = waiting(sock, feature, load, burst=2)
    for i in range(3):  # two tokens, then none
        assert conn._arrived(arrival(id=i, op="publish")) is None
    codes = [r["error"]["code"] for r in replies(sock)]
    assert codes == ["unavailable", "unavailable", "rate_limited"] and load.shed == 2
    # an SOS without a token is refused like any command, not started
    assert conn._arrived(arrival(id=3, op="alert.trigger", client_alert_id="a4")) is None
    assert replies(sock)[-1]["error"]["code"] == "rate_limited" and feature.started == []


async def test_chat_taken_at_the_door_is_not_judged_again_by_the_loop() -> None:
    sock, feature = Socket(), Sos()
    conn = waiting(sock, feature, Load(overloaded=True, answers=[False, True]))
    passed = conn._arrived(arrival(id=5, op="publish", channel="public:x"))
    assert passed is not None and sock.out == []
    await run_loop(conn, passed)
    assert replies(sock) == [{"id": 5, "ok": True}] and feature.handled == ["publish"]


async def test_without_overload_chat_is_left_to_the_loop_undecoded() -> None:
    sock, feature = Socket(), Sos()
    conn = waiting(sock, feature, Load(overloaded=False))
    message = arrival(id=1, op="publish", channel="public:x")
    assert conn._arrived(message) is message and sock.out == []


async def test_a_banned_session_leaves_its_frames_to_the_loop() -> None:
    sock, feature = Socket(), Sos()
    conn = waiting(sock, feature, Load(overloaded=True))
    conn._banned = "spam"  # the loop asks the store whether the ban still holds
    message = arrival(id=1, op="publish")
    assert conn._arrived(message) is message and sock.out == []
