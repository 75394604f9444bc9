"""The alert fault scenarios (loadtests/faults/alerts.py), small: real nodes killed at each
step, Redis restarted empty, providers hanging or throttling, through the real SDKs."""

from __future__ import annotations

import pytest

from realtime_safety.loadtests.faults.alerts import KILL_STEPS, SCENARIOS, kill_steps
from realtime_safety.loadtests.faults.report import FaultResult


def run(name: str) -> FaultResult:
    result = SCENARIOS[name].run(0.05)
    print(result.row())
    return result


@pytest.mark.parametrize("step", list(KILL_STEPS))
def test_a_node_killed_at_any_step_of_an_alert_loses_and_repeats_nothing(step: str) -> None:
    r = kill_steps(0.05, [step])  # one step per test: the workers share them out
    print(r.row())
    assert r.sent > 0 and r.lost == 0 and r.duplicated == 0 and r.delivered == r.sent, r
    assert r.ok, r.notes


def test_jobs_lost_with_redis_are_requeued_from_the_store() -> None:
    r = run("alert-redis-restart")
    assert r.sent > 0 and r.lost == 0 and r.duplicated == 0, r
    assert r.ok, r.notes


def test_a_hanging_sms_provider_holds_up_no_other_route() -> None:
    r = run("alert-provider-hang")
    assert r.lost == 0 and r.extra["sms status while hanging"] == "queued (sms: no answer in 1 s)"
    assert r.ok, r


def test_throttling_providers_are_retried_no_sooner_than_they_ask() -> None:
    r = run("alert-provider-429-5xx")
    assert r.lost == 0 and r.duplicated == 0 and r.extra["shortest retry gap s"] >= 1.9, r
    assert r.ok, r
