"""Fault scenarios: alert providers that hang, throttle (429) or fail (5xx), through the real
firebase-admin and twilio SDKs pointed at the local fakes. Push must not wait for a hanging
SMS provider; a provider's `Retry-After` is honoured; every alert is delivered once. The nodes
and helpers are those of the alert scenarios (`alerts.py`)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Any

from realtime_safety.alerts.plan import alert_id_for

from ..fakeproviders import FakeProviders
from .alerts import (
    HERE,
    People,
    node_env,
    node_proc,
    queues_idle,
    status_view,
    until_ok,
    wait_until,
    workdir,
    ws_url,
)
from .cluster import Proc
from .report import FaultResult, Scenario


def _crowd(node: Proc, alerts: int) -> list[People]:
    """One owner per alert, each with one SMS contact and one app user."""
    crowd = [People(1) for _ in range(alerts)]
    for p in crowd:
        p.register(node)
    return crowd


async def _sos(node: Proc, crowd: list[People]) -> None:
    for p in crowd:
        await until_ok(
            ws_url(node), p.owner, "alert.trigger", kind="sos", location=HERE, client_alert_id="sos"
        )


async def _hang(work: Path, fakes: FakeProviders, alerts: int, hold_s: float) -> dict[str, Any]:
    node = node_proc(work, node_env(work, fakes))
    node.start()
    try:
        crowd = _crowd(node, alerts)
        fakes.script.twilio_hang.set()
        started = time.monotonic()
        await _sos(node, crowd)
        # Push goes out while every SMS hangs.
        pushed = await wait_until(
            lambda: all(fakes.accepted_push.count(p.token) for p in crowd), 15
        )
        push_s = time.monotonic() - started
        # The hang outlasts the provider timeout (retries hang too), not the six attempts.
        await asyncio.sleep(hold_s)
        hanging = await status_view(node, crowd[0].owner, alert_id_for(crowd[0].owner, "sos"))
        fakes.script.twilio_hang.clear()
        released = time.monotonic()
        notified = await wait_until(
            lambda: all(all(p.sms_counts(fakes).values()) for p in crowd), 30
        )
        recovery = time.monotonic() - released
        settled = await wait_until(lambda: queues_idle(work), 30)  # the counts are final
        return {
            "pushed": pushed,
            "push_s": push_s,
            "sms_while_hanging": hanging.get(("sms", crowd[0].phones[0])),
            "notified": notified and settled,
            "recovery_s": recovery,
            "counts": sum((p.sms_counts(fakes) for p in crowd), Counter()),
            "requests": len(fakes.sms),
        }
    finally:
        node.kill()


def _hang_scenario(scale: float) -> FaultResult:
    alerts = max(3, int(40 * scale))
    result = FaultResult("alert-provider-hang", "the SMS provider accepts and never answers")
    with FakeProviders() as fakes, workdir() as work:
        found = asyncio.run(_hang(work, fakes, alerts, 2.5 + 2 * scale))
    counts: Counter[str] = found["counts"]
    result.sent = result.acked = alerts
    result.delivered = sum(1 for n in counts.values() if n >= 1)
    result.lost = sum(1 for n in counts.values() if n < 1)
    # A request the provider held past our timeout and then accepted is sent again by the
    # retry: the documented window (timeouts), reported apart.
    result.extra["in-window"] = sum(max(0, n - 1) for n in counts.values())
    result.extra["sms requests"] = found["requests"]
    result.extra["push while SMS hangs s"] = round(found["push_s"], 2)
    result.extra["sms status while hanging"] = found["sms_while_hanging"]
    result.recovery_s = found["recovery_s"]
    result.ok = found["pushed"] and found["notified"] and not result.lost
    # What the owner sees while it hangs: not sent yet, and why (the timeout fired).
    result.ok = result.ok and found["sms_while_hanging"] == "queued (sms: no answer in 1 s)"
    return result


async def _throttled(
    work: Path, fakes: FakeProviders, alerts: int, retry_after_s: int
) -> dict[str, Any]:
    node = node_proc(work, node_env(work, fakes))
    node.start()
    try:
        crowd = _crowd(node, alerts)
        fakes.script.retry_after = str(retry_after_s)
        fakes.script.twilio_fail = [429, 503] * alerts
        fakes.script.fcm_fail = [429] * alerts
        await _sos(node, crowd)
        notified = await wait_until(
            lambda: all(
                all(p.sms_counts(fakes).values()) and fakes.accepted_push.count(p.token)
                for p in crowd
            ),
            40,
        )
        settled = await wait_until(lambda: queues_idle(work), 20)  # the counts are final
        gaps = []
        for p in crowd:  # seconds between consecutive requests for the same number
            times = [r.at for r in fakes.sms if r.body.get("To") == p.phones[0]]
            gaps += [b - a for a, b in itertools.pairwise(times)]
        return {
            "notified": notified and settled,
            "counts": sum((p.sms_counts(fakes) for p in crowd), Counter()),
            "push": Counter(t for t in fakes.accepted_push if t in {p.token for p in crowd}),
            "min_gap_s": min(gaps) if gaps else None,
        }
    finally:
        node.kill()


def throttled(scale: float, retry_after_s: int = 2) -> FaultResult:
    """Providers answering 429/503 with `Retry-After: retry_after_s` (whole seconds, as HTTP
    has it; the retry backoff without it is 0.1-0.6 s here)."""
    alerts = max(2, int(20 * scale))
    result = FaultResult(
        "alert-provider-429-5xx",
        f"SMS 429 then 503, push 429, each with Retry-After: {retry_after_s}",
    )
    with FakeProviders() as fakes, workdir() as work:
        found = asyncio.run(_throttled(work, fakes, alerts, retry_after_s))
    counts: Counter[str] = found["counts"]
    result.sent = result.acked = alerts
    result.delivered = sum(1 for n in counts.values() if n >= 1)
    result.lost = sum(1 for n in counts.values() if n < 1)
    result.duplicated = sum(max(0, n - 1) for n in counts.values()) + sum(
        max(0, n - 1) for n in found["push"].values()
    )
    gap = found["min_gap_s"]
    result.extra["shortest retry gap s"] = None if gap is None else round(gap, 2)
    # Retry-After honoured (a little slack for the two clocks on one machine).
    result.ok = found["notified"] and not result.lost and not result.duplicated
    result.ok = result.ok and gap is not None and gap >= retry_after_s - 0.1
    return result


SCENARIOS: dict[str, Scenario] = {
    "alert-provider-hang": Scenario(
        "the SMS provider hangs: push still goes out, SMS once it answers", _hang_scenario
    ),
    "alert-provider-429-5xx": Scenario(
        "providers answer 429/503 with Retry-After: honoured, then delivered once",
        throttled,
    ),
}
