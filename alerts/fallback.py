"""Fallback across routes: an emergency contact who has both the app and a phone number, and
whose app has not confirmed a notice within `fallback_s` of its first send (no
`alert.received` on the WebSocket or push route, no `alert.ack`), gets it by SMS.

As durable as the rest of the plan (`alerts.records`):
- Arming: the first WebSocket or push job of (alert, contact, purpose) writes a record in
  `alert_fallbacks` (key "alert id|user|purpose", ix = when to look) before it sends. The job is
  done only after that, so a node killed before arming leaves the job to run again, and arm.
- Firing: every node's ticker claims the records that are due by compare-and-set (a lease of
  `lease_s`), then either settles one (the app confirmed, the contact acknowledged, the alert
  was resolved, the owner removed the contact) or appends ["sms", phone, purpose] to the
  alert's plan in one compare-and-set write and queues it. A node killed in between leaves
  the record leased: after the lease another node does the same again (the append is
  idempotent, and the reconciler queues any planned job that is not finished).
The fallback is recorded on the SMS's delivery record (`fallback_for`: the contact's user id),
which `alert.status` shows. A receipt that arrives in the moment between the check and the
append does not stop the SMS: one text too many, never one too few.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from realtime_safety.storage import DocStore, StoreUnavailable

from .metrics import AlertMetrics
from .model import now_ms
from .records import RECEIVED, Deliveries, finished
from .views import still_reaches

log = logging.getLogger("realtime.alerts")

COLL = "alert_fallbacks"
QueueSms = Callable[[str, str, str], Awaitable[None]]  # (alert id, phone, purpose)


def fallback_key(alert_id: str, user: str, purpose: str) -> str:
    return f"{alert_id}|{user}|{purpose}"


class Fallbacks:
    def __init__(
        self,
        docs: DocStore,
        queue_sms: QueueSms,
        metrics: AlertMetrics,
        *,
        after_s: float,
        lease_s: float,
        tier_s: Mapping[int, float] | None = None,
    ) -> None:
        self._docs = docs
        self._deliveries = Deliveries(docs)
        self._queue_sms = queue_sms
        self._metrics = metrics
        self.after_s = after_s  # for a contact of any tier not in `tier_s`
        self.tier_s = dict(tier_s or {})
        self._lease_ms = int(lease_s * 1000)

    async def arm(self, alert: dict[str, Any], user: str, purpose: str) -> None:
        """Before a contact's first WebSocket or push send for `purpose` (not a resolve): if
        the contact has a phone, the SMS fallback is due `after_s` (or its tier's own delay)
        from now (once: a re-run finds it armed)."""
        if self.after_s <= 0 and not self.tier_s:
            return  # (a resolved alert's notices never get here: the worker cancels them)
        contact = await self._contact(alert["owner"], user)
        if contact is None:
            return
        phone, tier = contact
        after_s = self.tier_s.get(tier, self.after_s)
        if after_s <= 0:
            return
        at = now_ms() + int(after_s * 1000)
        record = {
            "alert_id": alert["id"],
            "user": user,
            "phone": phone,
            "purpose": purpose,
            "at": at,  # settled: `state` (what became of it) and `settled` (when)
        }
        await self._docs.insert(COLL, fallback_key(alert["id"], user, purpose), record, ix=at)

    async def _contact(self, owner: str, user: str) -> tuple[str, int] | None:
        """The phone and tier of `user` among the owner's contacts, if it has a phone."""
        contacts = await self._docs.get("contacts", owner)
        for contact in (contacts or {}).get("contacts", []):
            if contact.get("user") == user and contact.get("phone"):
                return str(contact["phone"]), int(contact.get("tier", 1))
        return None

    def task(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._ticker(), name="alert-fallback")

    async def _ticker(self) -> None:
        shortest = min([s for s in (self.after_s, *self.tier_s.values()) if s > 0], default=1.0)
        pause = max(0.05, min(1.0, shortest / 4))
        while True:
            try:
                await self.fire_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alerts: fallback pass failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(pause)

    async def fire_due(self) -> None:
        for key, record in await self._docs.below(COLL, now_ms(), 50):
            version = record.pop("_v")
            lease = now_ms() + self._lease_ms
            if not await self._docs.put(COLL, key, record, ix=lease, version=version):
                continue  # another node has it
            outcome = await self._decide(record)
            await self._docs.put(COLL, key, {**record, "state": outcome, "settled": now_ms()})
            self._metrics.fallbacks.labels("sms" if outcome == "sms" else "not_needed").inc()

    async def _decide(self, record: dict[str, Any]) -> str:
        """What became of the fallback: sms (planned and queued), or why it was not needed."""
        alert_id, user, phone, purpose = (
            record["alert_id"],
            record["user"],
            record["phone"],
            record["purpose"],
        )
        alert = await self._docs.get("alerts", alert_id)
        if alert is None or alert["state"] != "active":
            return "resolved"
        if user in alert["acked_by"]:
            return "acked"
        if not await still_reaches(self._docs, alert, "sms", phone):
            return "removed"  # the owner took the contact (and the number) off since
        deliveries = await self._deliveries.of(alert_id)
        if any(deliveries.get((r, user), {}).get("status") in RECEIVED for r in ("ws", "push")):
            return "received"
        if finished(deliveries.get(("sms", phone)), purpose):
            return "texted"  # the number is also a contact of its own, and has the SMS

        def label(doc: dict[str, Any]) -> None:
            doc.setdefault("fallback_for", user)

        if not await self._plan(alert_id, ["sms", phone, purpose]):
            return "resolved"
        await self._deliveries.update(alert_id, "sms", phone, label)
        await self._queue_sms(alert_id, phone, purpose)
        return "sms"

    async def _plan(self, alert_id: str, job: list[str]) -> bool:
        """Append the SMS to the alert's plan (compare-and-set), and have the alert looked at
        again within the lease, so that the reconciler queues it if this node does not. False
        if the alert was resolved meanwhile."""
        for _ in range(50):
            doc = await self._docs.get("alerts", alert_id)
            if doc is None or doc["state"] != "active":
                return False
            if job in doc.get("jobs", []):
                return True
            recheck = now_ms() + self._lease_ms
            doc["jobs"] = [*doc.get("jobs", []), job]
            doc["due"] = recheck if doc.get("due") is None else min(doc["due"], recheck)
            if await self._docs.put("alerts", alert_id, doc, ix=doc["due"], version=doc["_v"]):
                return True
        raise StoreUnavailable(f"alert {alert_id} too busy")
