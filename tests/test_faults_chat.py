"""The chat fault scenarios of loadtests/faults/chat.py, small (one implementation for the
suite and the tests): real nodes, a real Redis and MongoDB stand-in, real SIGKILL and
SIGSTOP/SIGCONT under publish load. Behaviour only: nothing acknowledged is lost or doubled,
order holds, clients resume by themselves. The figures are measured by
`python -m realtime_safety.loadtests faults`, never asserted. (The scenario `node-kill`, the
subscribers' node killed under a publisher elsewhere, is not run here: publisher-node-kill
kills half the subscribers' node too, test_cluster.py's SIGKILL test checks the same resume
message by message, and test_presence.py the killed node's members leaving.)"""

from __future__ import annotations

import pytest

from realtime_safety.loadtests.faults.chat import SCENARIOS
from realtime_safety.loadtests.faults.report import FaultResult

SCALE = 0.1  # 4 subscribers, 20 msg/s, pauses of 2 s: each scenario well under 30 s


@pytest.fixture(autouse=True)
def shared_mongo(mongo_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's MongoDB for each scenario's cluster (a database of its own), instead of
    a MongoDB process started and stopped per scenario; store-pause, which pauses its
    MongoDB, still starts its own."""
    monkeypatch.setenv("MONGODB_URI", mongo_uri)


def run(name: str) -> FaultResult:
    result = SCENARIOS[name].run(SCALE)
    print(result.row(), result.notes)
    return result


def assert_nothing_lost(result: FaultResult) -> None:
    assert result.acked > 0, result.row()
    assert result.lost == 0 and result.extra["missing"] == 0, result.row()
    assert result.duplicated == 0, result.row()
    assert result.extra["order_errors"] == 0, result.row()
    assert "seq_conflicts" not in result.extra, result.row()
    assert "errors" not in result.extra, result.row()  # only `unavailable`, never `internal`
    # A message posted during the fault in a channel that then goes quiet arrives anyway.
    assert result.extra["last_words"] == "delivered", result.row()
    assert result.recovery_s is not None, result.row()  # delivery resumed by itself
    n = result.extra["subscribers"]
    assert result.extra["present"] == f"{n}/{n}", result.row()  # presence came back too
    assert result.ok, result.row()


def test_publisher_node_kill_retries_with_the_same_id_and_nothing_doubles() -> None:
    result = run("publisher-node-kill")
    assert_nothing_lost(result)
    # The client library's own retries (with backoff, on the next connection) carried every
    # interrupted publish over; none gave up on a dead socket.
    assert result.extra["gave_up"] == 0, result.row()
    moved, victims = map(int, result.extra["resumed"].split("/"))
    assert victims > 0 and moved == victims


def test_redis_restart_loses_nothing_and_fan_out_resumes() -> None:
    assert_nothing_lost(run("redis-restart"))


def test_redis_pause_loses_nothing_and_fan_out_resumes() -> None:
    assert_nothing_lost(run("redis-pause"))


def test_store_pause_answers_unavailable_and_retries_land_once() -> None:
    result = run("store-pause")
    assert_nothing_lost(result)
    assert result.extra["unavailable"] > 0, result.row()  # refused, not hung
