"""Gaps found by mutation testing (scripts/mutate session): the moderator's watch patterns,
through a real server process."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
from conftest import Node, token
from websockets.frames import Frame, Opcode
from wire import Raw

from realtime_safety.protocol.frames import wire_frame
from realtime_safety.realtime import config
from realtime_safety.realtime.node import Node as RealNode


async def test_watch_patterns_are_1_to_255_character_strings(single_node: Node) -> None:
    """`mod.watch` takes a glob of 1-255 characters and refuses anything else as bad_request,
    keeping the connection (mutants: realtime/moderation.py, `not isinstance(pattern, str) or
    not 1 <= len(pattern) <= 255` with `and`, and with 2 for 1)."""
    mod = await Raw.open(single_node.url, token("mona", roles=["user", "moderator"]))
    assert (await mod.ok("mod.watch", pattern="*"))["patterns"] == ["*"]
    longest = "room:" + "x" * 250
    assert (await mod.ok("mod.watch", pattern=longest))["patterns"] == ["*", longest]
    for bad in (5, ["room:*"], None, "", longest + "y"):
        assert await mod.error("mod.watch", pattern=bad) == "bad_request", bad
    assert (await mod.ok("mod.watch", pattern="*"))["patterns"] == ["*", longest]  # no repeat
    await mod.close()


async def test_unwatch_removes_one_pattern_or_all(single_node: Node) -> None:
    """`mod.unwatch {pattern}` removes that pattern and keeps the others; without a pattern it
    removes them all (mutant: realtime/moderation.py, `pattern not in (None, p)` with `in`)."""
    mod = await Raw.open(single_node.url, token("mona", roles=["user", "moderator"]))
    for p in ("room:*", "public:*", "alert:*"):
        await mod.ok("mod.watch", pattern=p)
    assert (await mod.ok("mod.unwatch", pattern="public:*"))["patterns"] == ["room:*", "alert:*"]
    assert (await mod.ok("mod.unwatch", pattern="nothing:*"))["patterns"] == ["room:*", "alert:*"]
    assert (await mod.ok("mod.unwatch"))["patterns"] == []
    assert (await mod.ok("mod.watch", pattern="room:*"))["patterns"] == ["room:*"]
    await mod.close()


async def test_history_without_a_limit_returns_the_newest_50(single_node: Node) -> None:
    """`history` without `limit` gives the newest 50 messages (docs/protocol-v1.md section 4: limit
    ≤ 200, default 50; mutant: realtime/connection.py, the default 50 as 51)."""
    ch = f"public:{uuid.uuid4().hex[:8]}"
    ann = await Raw.open(single_node.url, token("ann"))
    for i in range(52):
        body = {"v": 1, "alg": "none", "text": str(i)}
        await ann.ok("publish", channel=ch, client_msg_id=f"m{i}", body=body)
    reply = await ann.ok("history", channel=ch)
    assert [m["seq"] for m in reply["messages"]] == list(range(3, 53))
    await ann.close()


async def test_an_invisible_user_looks_exactly_offline(single_node: Node) -> None:
    """The `presence` reply for an invisible user's `user:` channel is the reply for a user
    who is offline, field for field, so it cannot tell the two apart (mutant:
    realtime/connection.py, the invisible reply's "cursor" field misnamed)."""
    bob_name, away = f"bob-{uuid.uuid4().hex[:6]}", f"away-{uuid.uuid4().hex[:6]}"
    bob = await Raw.open(single_node.url, token(bob_name))
    carol = await Raw.open(single_node.url, token("carol", ["user", "moderator"]))
    await bob.ok("presence.invisible", invisible=True)
    hidden = await carol.ok("presence", channel=f"user:{bob_name}")
    offline = await carol.ok("presence", channel=f"user:{away}")
    for reply in (hidden, offline):
        reply.pop("id", None)
        reply.pop("channel")
    assert hidden == offline
    assert hidden["members"] == [] and hidden["total"] == 0 and hidden["cursor"] == 0
    await bob.ok("presence.invisible", invisible=False)
    for r in (bob, carol):
        await r.close()


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_a_wire_frame_is_the_frame_websockets_itself_would_send(size: int) -> None:
    """The pre-built server frame is byte for byte what the websockets library serializes,
    at each payload-length encoding's edges: 7 bits, 16 bits up to 65535, 64 bits from 65536
    (mutant: protocol/frames.py, `n < 65536` with `<=`)."""
    data = b"x" * size
    assert wire_frame(data, True) == Frame(Opcode.BINARY, data).serialize(mask=False)
    assert wire_frame(data.decode(), False) == Frame(Opcode.TEXT, data).serialize(mask=False)


async def test_sigterm_stops_a_node_that_runs_retention(node_factory: Any) -> None:
    """SIGTERM closes every connection with 1001 and the process exits cleanly, also while the
    retention loop waits for its next round (mutant: realtime/node.py, the retention task's
    cancel removed from stop: shutdown would wait out RT_RETENTION_INTERVAL_S, an hour)."""
    node: Node = node_factory("retention", RT_RETENTION="public=30d")
    raw = await Raw.open(node.url, token("ron"))
    await raw.ok("ping")
    assert node.proc is not None
    node.proc.terminate()
    assert await raw.close_code(10) == 1001
    assert await asyncio.to_thread(node.proc.wait, 20) == 0


async def test_a_node_runs_its_alert_service_on_a_lane_and_stops_its_own_tasks(
    tmp_path: Any,
) -> None:
    """In process: the node starts the alert lane (its work runs on another thread than the
    node's loop) and a task it spawned is cancelled when it stops (survivors of scripts/mutate
    session --seed 30: the lane's start and the node's task references removed)."""
    tmp_path.chmod(0o700)
    settings = config.load({"RT_JWT_SECRET": "s" * 32, "RT_DATA_DIR": str(tmp_path)})
    node = RealNode(settings)
    await node.start()
    stopped = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    try:

        async def where() -> int:
            return threading.get_ident()

        assert await node.alerts.lane.run(where()) != threading.get_ident()
        node.spawn(forever(), "forever")
        await asyncio.sleep(0)
    finally:
        await node.stop()
    assert stopped.is_set()
