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
