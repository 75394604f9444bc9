"""Fault scenarios: alerts (see loadtests/faults/__init__.py)."""

from __future__ import annotations

from .report import Scenario

SCENARIOS: dict[str, Scenario] = {}
