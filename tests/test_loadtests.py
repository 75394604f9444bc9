"""A tiny run of every benchmark scenario, so the harness cannot rot. Behaviour only: the
numbers are measured by `python -m realtime_safety.loadtests`, never asserted."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

# Slow (whole benchmark harnesses, the peers' servers): not in the main run; scripts/test runs
# them after it with `-m bench`.
pytestmark = pytest.mark.bench


@pytest.mark.timeout(900)  # the first run builds the Django Channels peer's virtualenv
def test_fanout_comparison_smoke(tmp_path: Path) -> None:
    """Every target of the comparison, tiny: the harness and the peers cannot rot. (The
    Django Channels peer builds its own virtualenv on first use.)"""
    from realtime_safety.loadtests import compare

    rows = [
        asdict(compare.fanout(kind, 20, 5, 50, clients=1, timeout_s=60, topology="embedded"))
        for kind in ("realtime", "socketio", "django", "raw")
    ]
    assert [r["delivered"] for r in rows] == [100, 100, 100, 100]
    assert [r["incomplete"] for r in rows] == [0, 0, 0, 0]
    assert [r["acked"] for r in rows] == [5, 5, 5, 5]  # the raw ceiling has no acks: as sent
    table = compare.write(rows, tmp_path, "smoke")
    assert "python-socketio" in table and list(tmp_path.glob("smoke-*.png"))


def test_idle_smoke() -> None:
    from realtime_safety.loadtests import compare

    row = compare.idle("realtime", 20)
    assert row["held"] == 20 and row["server_kb_per_connection"] > 0


@pytest.mark.timeout(900)  # as above, whichever of the two runs first
def test_chat_smoke(tmp_path: Path) -> None:
    """Rooms of a few members, everyone posting, for every target."""
    from realtime_safety.loadtests import chat, compare

    rows = [
        asdict(chat.run(kind, 20, 5, 0.5, 1.0, topology="embedded", timeout_s=60))
        for kind in ("realtime", "socketio", "django", "raw")
    ]
    assert [r["posted"] for r in rows] == [40, 40, 40, 40]
    assert [r["delivered"] for r in rows] == [r["expected"] for r in rows] == [200, 160, 160, 200]
    assert rows[0]["acked"] == 40 and rows[0]["disconnects"] == "none"
    compare.write(rows, tmp_path, "chat")
    assert list(tmp_path.glob("chat-*.png"))


def test_store_smoke() -> None:
    from realtime_safety.loadtests import store

    results = store.run("sqlite", [1, 4], 40)
    assert len(results) == 4 and all(r.appends == 40 for r in results)
    assert "appends/s" in store.report(results)


def test_presence_smoke(redis_server: object) -> None:
    from realtime_safety.loadtests import presence

    result = presence.run(rate=100, seconds=0.3, members=50, redis_url=redis_server.url)  # type: ignore[attr-defined]
    assert result.operations == 60 and result.members_before == 50


def test_alerts_smoke() -> None:
    from realtime_safety.loadtests import alerts

    result = alerts.run(alerts=5, rate=20, topology="embedded")
    assert result.missing == 0 and result.latency_ms_max > 0


@pytest.mark.timeout(300)
def test_two_node_fanout_smoke() -> None:
    """Subscribers split over two nodes on one Redis, for ours and for the peer."""
    from realtime_safety.loadtests import compare

    for kind in ("realtime", "socketio"):
        row = compare.fanout(kind, 20, 5, 50, clients=2, timeout_s=90, nodes=2)
        assert row.delivered == 100 and row.nodes == 2 and row.disconnects == "none"
