"""Overload control (issue 21): an overloaded node refuses chat work at once with `unavailable`
and a `retry_after_ms`, never an alert op, and takes chat again once the load is gone; the
embedded store serves the alert documents' lane before chat's."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Node, base_env, token
from wire import Raw, plain, until

from realtime_safety.client import Client
from realtime_safety.loadtests.support import stalled_subscriber
from realtime_safety.realtime.overload import LoadMonitor, OverloadLimits

# --- the load signal ------------------------------------------------------------------------


def monitor(queued: list[int], cool_s: float = 1.0) -> LoadMonitor:
    limits = OverloadLimits(
        lag_s=0.1, queued_frames=100, backend_calls=10, interval_s=0.05, cool_s=cool_s
    )
    return LoadMonitor(limits, lambda: queued[0], lambda: 0)


def refused_of(load: LoadMonitor, n: int) -> int:
    return sum(load.refuse() for _ in range(n))


def test_lag_over_the_limit_sheds_a_growing_share_and_calm_brings_it_back() -> None:
    load = monitor([0])
    load.sample(0.1)  # at the limit: fine
    assert not load.overloaded and refused_of(load, 100) == 0
    load.sample(0.1 * 1.25)
    # a tenth per sample, times how far over the limit the lag is
    assert load.reason == "event-loop lag" and load.fraction == pytest.approx(0.125)
    load._random = iter([0.05, 0.15] * 50).__next__  # type: ignore[method-assign]
    assert refused_of(load, 100) == 50  # draws under 0.125 are refused
    load.sample(0.1 * 3)
    assert load.fraction == pytest.approx(0.425)  # far over: a faster climb
    load.sample(1.0)  # ten times over: at most half at once
    assert load.fraction == pytest.approx(0.925)
    for _ in range(20):
        load.sample(0.5)
    assert load.fraction == 1.0 and refused_of(load, 10) == 10
    assert load.shed == 60
    for _ in range(19):  # calm: back to zero over cool_s (20 samples of 50 ms)
        load.sample(0.0)
    assert load.overloaded
    load.sample(0.0)
    assert not load.overloaded and load.reason == "" and refused_of(load, 100) == 0


def test_a_full_send_queue_refuses_everything_at_once() -> None:
    queued = [101]
    load = monitor(queued, cool_s=0.5)
    load.sample(0.0)
    assert load.fraction == 1.0 and load.reason == "send queues"
    assert load.retry_after_ms() == 501
    queued[0] = 0
    for _ in range(10):
        load.sample(0.0)
    assert not load.overloaded


def test_a_slow_backend_sheds_a_growing_share_like_lag() -> None:
    latency = [0.0]
    limits = OverloadLimits(
        lag_s=0.1, queued_frames=100, backend_calls=10, backend_latency_s=0.2, cool_s=1.0
    )
    load = LoadMonitor(limits, lambda: 0, lambda: 0, lambda: latency[0])
    latency[0] = 0.2  # at the limit: fine
    load.sample(0.0)
    assert not load.overloaded
    latency[0] = 0.21
    load.sample(0.0)
    load.sample(0.0)
    assert load.reason == "backend latency" and load.fraction == pytest.approx(0.2)
    latency[0] = 0.0
    for _ in range(4):
        load.sample(0.0)
    assert load.fraction == pytest.approx(0.0) and not load.overloaded


async def test_a_backend_call_still_waiting_counts_at_once() -> None:
    """The latency signal: the moving average of answered calls, or a quarter of the age of
    the oldest call still waiting when that is longer (a store that stopped answering answers
    nothing)."""
    from realtime_safety.channels.metrics import ChannelMetrics
    from realtime_safety.channels.service import ChannelService

    class NoHub:  # bounded() uses only the hub's metrics
        metrics = ChannelMetrics()

    service = ChannelService(None, NoHub(), timeout_s=5, recovery_limit=10)  # type: ignore[arg-type]
    assert service.slowest_s() == 0.0
    stuck = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    call = asyncio.ensure_future(service.bounded("request", stuck))
    await until(lambda: service.slowest_s() >= 0.05, 5, what="the waiting call to age")
    assert service.slowest_s() <= (time.monotonic() - started) / 4  # a quarter of its age
    stuck.set_result(None)
    await call
    took = time.monotonic() - started
    average = service.slowest_s()  # now the answered call's share of the moving average
    assert 0.004 <= average <= took / 10
    for _ in range(30):  # fast calls bring the average down
        await service.bounded("request", asyncio.sleep(0))
    assert service.slowest_s() < average / 10


async def test_a_slow_backends_average_fades_without_calls() -> None:
    """A node that refuses chat because its store was slow makes no calls that could lower
    the average again: it fades by itself (else a store pause would stop chat for good)."""
    from realtime_safety.channels.metrics import ChannelMetrics
    from realtime_safety.channels.service import LATENCY_HALF_LIFE_S, ChannelService

    class NoHub:
        metrics = ChannelMetrics()

    service = ChannelService(None, NoHub(), timeout_s=5, recovery_limit=10)  # type: ignore[arg-type]
    stuck = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(service.bounded("request", stuck))
    await until(lambda: service.slowest_s() >= 0.2, 5, what="a slow call")
    stuck.set_result(None)
    await call
    slow = service.slowest_s()
    assert slow >= 0.08  # a tenth of a call of 0.8 s or more
    started = time.monotonic()
    await until(lambda: service.slowest_s() < slow / 4, 10, what="the average to fade")
    assert time.monotonic() - started >= LATENCY_HALF_LIFE_S  # two half-lives, not at once


# --- a real node -----------------------------------------------------------------------------


@pytest.fixture
def small_node(tmp_path: Path) -> Iterator[Node]:
    node = Node(
        base_env(
            tmp_path,
            RT_OVERLOAD_QUEUED_FRAMES="8",  # a few frames behind one stalled reader
            RT_OVERLOAD_COOL_S="0.3",
            RT_RATE_PER_S="1000",
            RT_RATE_BURST="1000",
        ),
        "overload",
    ).start()
    yield node
    node.stop()


async def test_an_overloaded_node_refuses_chat_and_still_takes_an_sos(small_node: Node) -> None:
    ch = f"public:{uuid.uuid4().hex[:8]}"
    stalled = stalled_subscriber(small_node.port, token("stalled"), ch)
    pub = await Raw.open(small_node.url, token("chatty"))
    owner = await Raw.open(small_node.url, token("in-danger"))
    body = plain("z" * 30_000)
    refused = None
    for i in range(400):  # frames pile up behind the reader that never reads
        reply = await pub.cmd("publish", channel=ch, client_msg_id=f"m{i}", body=body)
        if not reply["ok"]:
            refused = reply["error"]
            break
    assert refused is not None, "never refused"
    assert refused["code"] == "unavailable" and refused["retry_after_ms"] > 300
    # while chat is refused: the SOS, the session's own ops and leaving a channel go through
    where = {"lat": 52.52, "lon": 13.405}
    alert = await owner.ok("alert.trigger", kind="sos", client_alert_id="a1", location=where)
    assert alert["alert_id"]
    await owner.ok("ping")
    assert await pub.error("history", channel=ch) == "unavailable"
    await pub.ok("unsubscribe", channel=ch)
    assert await asyncio.to_thread(small_node.metric, "rt_shed_fraction") == 1
    assert await asyncio.to_thread(small_node.metric, "rt_shed_commands_total") >= 2
    # the load goes (the stalled reader leaves): chat is taken again after the cool-down
    # The Python client retries a refused publish no sooner than it was told to, with the same
    # client_msg_id; once the load goes (the stalled reader leaves) the publish lands, once.
    async with Client([small_node.url], token("app")) as app:
        started = asyncio.get_running_loop().time()
        publishing = asyncio.create_task(app.publish(ch, plain("hi"), attempts=50))
        await until(lambda: (small_node.metric("rt_shed_commands_total") or 0) >= 3, what="refused")
        stalled[0].close()
        reply = await publishing
        assert asyncio.get_running_loop().time() - started >= refused["retry_after_ms"] / 1000
        # history is chat work too: shed while the fraction falls back, so retried like it
        history = await app.retrying("history", attempts=50, channel=ch, limit=5)
        assert [m["seq"] for m in history["messages"]].count(reply["seq"]) == 1
    assert await asyncio.to_thread(small_node.metric, "rt_shed_fraction") < 1
    await pub.close()
    await owner.close()
