"""The fault suite: real faults injected into real processes on loopback, each bounded in time,
each reporting what was sent, acknowledged, delivered, lost and duplicated.

    python -m realtime_safety.loadtests faults list            # the scenarios
    python -m realtime_safety.loadtests faults <name> [...]    # one (or several) of them
    python -m realtime_safety.loadtests faults all

Scenarios live with their topic: `chat` (node and Redis/store faults under publish load),
`badinput` (generated hostile frames), `exhaustion` (resource attacks: connection floods,
slowloris, readers that never read), `alerts` (trigger crashes, lost jobs), `alert_providers`
(hanging, throttling and failing providers), `checkins` (check-in timers through node death and
a Redis restart).
Each module offers `SCENARIOS: dict[str, Scenario]`; tests in `tests/test_faults_*.py` run the
same scenarios small.
"""

from __future__ import annotations

from .report import FaultResult, Scenario

__all__ = ["FaultResult", "Scenario", "scenarios"]


def scenarios() -> dict[str, Scenario]:
    from . import alert_providers, alerts, badinput, chat, checkins, exhaustion

    found: dict[str, Scenario] = {}
    for module in (chat, badinput, exhaustion, alerts, alert_providers, checkins):
        found.update(module.SCENARIOS)
    return found
