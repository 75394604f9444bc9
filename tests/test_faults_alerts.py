"""The alert fault scenarios (loadtests/faults/alerts.py, alert_providers.py), small: real nodes
killed at each step, Redis restarted empty, providers throttling, through the real SDKs. (A
hanging provider: test_alerts_promises.py, one alert through the same path.)"""

from __future__ import annotations

import pytest

from realtime_safety.loadtests.faults.alert_providers import throttled
from realtime_safety.loadtests.faults.alerts import KILL_STEPS, SCENARIOS, kill_steps


@pytest.fixture
def shared_mongo(mongo_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's MongoDB for the scenario's cluster (a database of its own), instead of a
    MongoDB process started and stopped for the one scenario."""
    monkeypatch.setenv("MONGODB_URI", mongo_uri)


@pytest.mark.parametrize("step", list(KILL_STEPS))
def test_a_node_killed_at_any_step_of_an_alert_loses_and_repeats_nothing(step: str) -> None:
    r = kill_steps(0.05, [step])  # one step per test: the workers share them out
    print(r.row())
    assert r.sent > 0 and r.lost == 0 and r.duplicated == 0 and r.delivered == r.sent, r
    assert r.ok, r.notes


@pytest.mark.usefixtures("shared_mongo")
def test_jobs_lost_with_redis_are_requeued_from_the_store() -> None:
    r = SCENARIOS["alert-redis-restart"].run(0.05)
    print(r.row())
    assert r.sent > 0 and r.lost == 0 and r.duplicated == 0, r
    assert r.ok, r.notes


def test_throttling_providers_are_retried_no_sooner_than_they_ask() -> None:
    # Retry-After: 1 s; without it the next attempt would come 0.1-0.6 s later.
    r = throttled(0.05, retry_after_s=1)
    print(r.row())
    assert r.lost == 0 and r.duplicated == 0 and r.extra["shortest retry gap s"] >= 0.9, r
    assert r.ok, r
