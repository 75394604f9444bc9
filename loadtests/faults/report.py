"""One result shape for every fault scenario, printed as a Markdown table row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FaultResult:
    scenario: str
    fault: str  # what was done, in a few words
    sent: int = 0  # messages / alerts / frames attempted
    acked: int = 0  # answered ok by the server
    delivered: int = 0  # reached whoever should have got them (distinct)
    lost: int = 0  # acknowledged but never delivered: must be 0
    duplicated: int = 0  # delivered more than once (beyond the documented window)
    recovery_s: float | None = None  # fault ended -> service back, where it applies
    extra: dict[str, Any] = field(default_factory=dict)  # scenario-specific figures
    ok: bool = True  # the scenario's own pass/fail verdict
    notes: str = ""

    def row(self) -> str:
        rec = "" if self.recovery_s is None else f"{self.recovery_s:.2f}"
        extra = ", ".join(f"{k}={v}" for k, v in self.extra.items())
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"| {self.scenario} | {self.fault} | {self.sent} | {self.acked} | {self.delivered} "
            f"| {self.lost} | {self.duplicated} | {rec} | {extra} | {verdict} |"
        )


HEADER = (
    "| scenario | fault | sent | acked | delivered | lost | duplicated | recovery s | figures "
    "| verdict |\n|---|---|---|---|---|---|---|---|---|---|"
)


@dataclass(frozen=True)
class Scenario:
    """`run(scale)` runs the scenario; scale 1.0 is the README's figure, tests use ~0.05."""

    help: str
    run: Callable[[float], FaultResult]
