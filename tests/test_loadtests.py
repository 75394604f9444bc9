"""A tiny run of every benchmark scenario, so the harness cannot rot. Behaviour only: the
numbers are measured by `python -m loadtests`, never asserted."""

from __future__ import annotations

from pathlib import Path

from loadtests import fanout


def test_fanout_smoke(tmp_path: Path) -> None:
    result = fanout.run(subscribers=20, messages=5, rate=50, clients=1, timeout_s=60)
    assert result.delivered == result.expected == 100
    assert result.latency_ms_p50 > 0
    table = fanout.report(result, tmp_path)
    assert "delivered_per_s" in table and list(tmp_path.glob("fanout-*.json"))


def test_store_smoke() -> None:
    from loadtests import store

    results = store.run("sqlite", [1, 4], 40)
    assert len(results) == 4 and all(r.appends == 40 for r in results)
    assert "appends/s" in store.report(results)


def test_presence_smoke(redis_server: object) -> None:
    from loadtests import presence

    result = presence.run(rate=100, seconds=0.3, members=50, redis_url=redis_server.url)  # type: ignore[attr-defined]
    assert result.operations == 60 and result.members_before == 50


def test_alerts_smoke() -> None:
    from loadtests import alerts

    result = alerts.run(alerts=5, rate=20, topology="embedded")
    assert result.missing == 0 and result.latency_ms_max > 0
