"""The durable delivery plan of an alert, and its per-recipient records.

An alert's record holds its plan: `jobs`, a list of `[route, to, purpose]` (purpose: "alert",
"escalate<N>", "resolve"), only ever appended to, in the same compare-and-set write that
creates the alert, takes an escalation step or resolves it. The `deliveries` records (key
"alert id|route|to") say per recipient and route what happened: `status` (what the owner
sees), `attempts`, `error`, `provider_id`, and for each purpose whether it is finished —
`sent`, `dead` (dead-lettered) or `skipped` (not needed any more). A planned job that is not
finished is put on the queue again by the reconciler, whatever happened to the queue.

A record's `status` only ever moves to what the server can prove (`advance`): `sent` (or
`outbox`) when a provider accepted it, `delivered` when the recipient's app said it has it
(`alert.received`) or Twilio's status callback said so, `undelivered` / `failed` from Twilio,
`acked` when the recipient acknowledged. Callbacks and receipts race the worker's own write,
and arrive in any order, so a status never goes back to a less certain one.
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


# How sure each status is that the recipient has the notice: a status replaces another only
# if it is at least as sure (`advance`), except where noted there.
STATUS_RANK = {
    "queued": 0,
    "cancelled": 0,
    "failed": 1,  # dead-lettered, or the provider says the message did not arrive
    "undelivered": 1,  # Twilio: the carrier could not deliver it
    "offline": 2,  # ws: pushed while the (visible) user had no connection anywhere
    "outbox": 2,  # no credentials: written to the development outbox
    "sent": 2,  # the provider (or the broker, for ws) accepted it
    "delivered": 3,  # the app's receipt, or the carrier's
    "acked": 4,  # the recipient acknowledged the alert
}
RECEIVED = frozenset({"delivered", "acked"})


def advance(doc: dict[str, Any], status: str) -> bool:
    """Set `status` unless it would tell less than what the record knows: nothing replaces
    `acked`; only `acked` replaces `delivered`; `cancelled` replaces only `queued`. A new
    send (`sent`) replaces an earlier failure; a provider's failure replaces `sent`."""
    current: str = doc.get("status", "queued")
    if status == current:
        return False
    if status == "cancelled":
        allowed = current == "queued"
    elif status in ("acked", "delivered"):
        allowed = STATUS_RANK[status] > STATUS_RANK.get(current, 0)
    else:
        allowed = STATUS_RANK.get(current, 0) < STATUS_RANK["delivered"]
    if allowed:
        doc["status"] = status
    return allowed


def warnings(alert: dict[str, Any]) -> list[str]:
    """What the owner and moderators must know about an alert's plan: `no_recipients` (no
    contact, no responder nearby: nobody is being notified)."""
    return [] if alert.get("jobs") else ["no_recipients"]


def recipient_view(doc: dict[str, Any]) -> dict[str, Any]:
    """One recipient and route as `alert.status` shows it (docs/protocol.md)."""
    view = {
        "to": doc["to"],
        "route": doc["route"],
        "status": doc["status"],
        "attempts": doc["attempts"],
        "error": doc.get("error"),
    }
    for extra in ("received_at", "fallback_for", "resolve_error"):
        if doc.get(extra) is not None:
            view[extra] = doc[extra]
    # the "resolved" notice, once there is one: sent, failed (given up), skipped, or pending
    for how, word in (("sent", "sent"), ("dead", "failed"), ("skipped", "skipped")):
        if "resolve" in doc.get(how, ()):
            view["resolve"] = word
            break
    else:
        if doc.get("resolve_error") is not None:
            view["resolve"] = "pending"
    return view


def mark(purpose: str, how: str) -> Callable[[dict[str, Any]], None]:
    """A change that marks `purpose` finished (`how` one of MARKS)."""

    def change(doc: dict[str, Any]) -> None:
        if purpose not in doc.setdefault(how, []):
            doc[how].append(purpose)

    return change
