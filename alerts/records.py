"""The durable delivery plan of an alert, and its per-recipient records.

An alert's record holds its plan: `jobs`, a list of `[route, to, purpose]` (purpose: "alert",
"escalate<N>", "resolve"), only ever appended to, in the same compare-and-set write that
creates the alert, takes an escalation step or resolves it. The `deliveries` records (key
"alert id|route|to") say per recipient and route what happened: `status` (what the owner
sees), `attempts`, `error`, `provider_id`, and for each purpose whether it is finished —
`sent`, `dead` (dead-lettered) or `skipped` (not needed any more). A planned job that is not
finished is put on the queue again by the reconciler, whatever happened to the queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from realtime_safety.storage import DocStore, StoreUnavailable

COLL = "deliveries"
MARKS = ("sent", "dead", "skipped")


def delivery_key(alert_id: str, route: str, to: str) -> str:
    return f"{alert_id}|{route}|{to}"


def job_key(alert_id: str, route: str, to: str, purpose: str) -> str:
    return f"{alert_id}|{route}|{to}|{purpose}"


def finished(delivery: dict[str, Any] | None, purpose: str) -> bool:
    return delivery is not None and any(purpose in delivery.get(m, ()) for m in MARKS)


def new_delivery(route: str, to: str) -> dict[str, Any]:
    return {
        "to": to,
        "route": route,
        "status": "queued",
        "attempts": 0,
        "provider_id": None,
        "error": None,
        "sent": [],
        "dead": [],
        "skipped": [],
    }


class Deliveries:
    def __init__(self, docs: DocStore) -> None:
        self._docs = docs

    async def of(self, alert_id: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every delivery record of an alert by (route, to)."""
        found = await self._docs.prefix(COLL, f"{alert_id}|", 10_000)
        return {(d["route"], d["to"]): d for d in found}

    async def get(self, alert_id: str, route: str, to: str) -> dict[str, Any] | None:
        return await self._docs.get(COLL, delivery_key(alert_id, route, to))

    async def update(
        self, alert_id: str, route: str, to: str, change: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Compare-and-set: apply `change` to the freshest copy (created if missing)."""
        key = delivery_key(alert_id, route, to)
        for _ in range(50):
            doc = await self._docs.get(COLL, key)
            if doc is None:
                fresh = new_delivery(route, to)
                change(fresh)
                if await self._docs.insert(COLL, key, fresh, ix=fresh["provider_id"]) is None:
                    return fresh
                continue
            change(doc)
            if await self._docs.put(COLL, key, doc, ix=doc["provider_id"], version=doc["_v"]):
                return doc
        raise StoreUnavailable(f"delivery record {key} too busy")

    async def by_provider_id(self, provider_id: str) -> list[tuple[str, dict[str, Any]]]:
        return await self._docs.find_ix(COLL, provider_id)


def mark(purpose: str, how: str) -> Callable[[dict[str, Any]], None]:
    """A change that marks `purpose` finished (`how` one of MARKS)."""

    def change(doc: dict[str, Any]) -> None:
        if purpose not in doc.setdefault(how, []):
            doc[how].append(purpose)

    return change
