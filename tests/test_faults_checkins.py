"""The check-in fault scenario (loadtests/faults/checkins.py), small: two real nodes, one
killed right after claiming a timer, Redis restarted empty; every missed check-in raises its
alert once, within 2 s of its expiry."""

from __future__ import annotations

from realtime_safety.loadtests.faults.checkins import SCENARIOS


def test_checkins_fire_once_on_time_through_a_killed_node_and_a_redis_restart() -> None:
    r = SCENARIOS["checkin-fire-time"].run(0.05)
    print(r.row())
    assert r.sent > 0 and r.acked == r.sent and r.lost == 0 and r.duplicated == 0, r
    assert r.extra["killed at a claim"] and -2000 <= r.extra["min"] <= r.extra["max"] <= 2000, r
    assert r.ok, r.notes
