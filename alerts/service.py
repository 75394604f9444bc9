"""Safety alerts (PROTOCOL.md section 7): trigger, live location, ack, resolve, status,
responders' shared locations, escalation, and the reconciler that keeps deliveries going.

Records (in the store's small-document collections, so in SQLite or MongoDB):
- `alerts` key alert id, ix = `due`, the next time a node must look at the alert (to finish
  queueing its plan, or to escalate); the record holds the plan (`jobs`, see `alerts.records`);
- `alert_quota` key owner -> the owner's recent triggers (the cluster-wide trigger limit);
- `active_alerts` key alert id (the moderators' list);
- `alert_trail` key "alert id|ts|digest", ix = ts (purged after RT_ALERT_TRAIL_DAYS);
- `deliveries` key "alert id|route|to", ix = the provider's message id (status webhooks);
- `contacts` key owner -> tiers of emergency contacts; `push_tokens` key "user|token".

A trigger is all-or-nothing: the alert id is derived from (owner, client_alert_id), the limit is
checked (and the slot reserved for that id) before anything else is written, and the alert is
stored with its whole plan in one insert — the commit point. An `ok` is sent only after it. A
retry finds the stored alert and finishes whatever the first attempt did not (deliveries
records, queue jobs), and so does any node's reconciler once the alert comes due, so a node
killed at any step, a store timeout or a queue that lost its data delays a notification but
never loses it. Escalation steps and resolve append to the plan in the same compare-and-set
write that changes the alert, so they follow the same rule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from realtime_safety.protocol import ProtocolError
from realtime_safety.storage import DocStore

from .delivery import Deliverer, DeliverySettings, IsOnline, Publish, alert_push
from .metrics import AlertMetrics
from .model import KINDS, MAX_NOTE, OUTCOMES, now_ms, parse_location
from .plan import (
    TRIGGER_WINDOW_MS,
    alert_id_for,
    due,
    plan,
    trail_key,
)
from .providers import PushProvider, SmsProvider
from .queue import JobQueue
from .reconcile import Reconciler
from .records import Deliveries, finished, job_key, new_delivery, recipient_view, warnings
from .responders import Responders

log = logging.getLogger("realtime.alerts")


def _no_fault(step: str) -> None:
    return None


@dataclass(frozen=True)
class AlertSettings:
    escalate_s: float = 120.0
    responder_radius_m: float = 2000.0
    responder_ttl_s: float = 900.0
    trail_days: float = 30.0
    trigger_limit: int = 5  # per user per 10 minutes, across the cluster
    reconcile_s: float = 10.0  # how long a plan may sit unfinished before any node re-queues it
    delivery: DeliverySettings = field(default_factory=DeliverySettings)


class AlertService:
    # The fault suite's node (loadtests.faults.node) replaces this to kill the process at a
    # named step; `realtime serve` never does.
    checkpoint: Callable[[str], None] = staticmethod(_no_fault)

    def __init__(
        self,
        docs: DocStore,
        queues: dict[str, JobQueue],
        push: PushProvider,
        sms: SmsProvider,
        responders: Responders,
        publish: Publish,
        is_online: IsOnline,
        settings: AlertSettings,
        node_id: str,
        *,
        metrics: AlertMetrics | None = None,
    ) -> None:
        self.metrics = metrics or AlertMetrics()
        self.docs = docs
        self.deliveries = Deliveries(docs)
        self.responders = responders
        self._publish = publish
        self.settings = settings
        self.delivery = Deliverer(
            docs,
            queues,
            push,
            sms,
            publish,
            is_online,
            settings.delivery,
            node_id,
            lambda step: self.checkpoint(step),
            self.metrics,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.reconciler = Reconciler(self)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks += self.delivery.tasks()
        self._tasks += self.reconciler.tasks()
        for provider, what in (
            (self.delivery.push, "push notifications"),
            (self.delivery.sms, "SMS"),
        ):
            if provider.name.startswith("outbox"):
                log.warning("alerts: no credentials: %s are written to the %s", what, provider.name)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.delivery.close()
        try:
            await self.responders.close()
        except Exception as exc:
            log.warning("alerts: close failed: %s", exc)

    # --- records ----------------------------------------------------------------------

    async def alert(self, alert_id: object) -> dict[str, Any]:
        if not isinstance(alert_id, str) or not 1 <= len(alert_id) <= 64:
            raise ProtocolError("bad_request", "'alert_id' must be a string")
        doc = await self.docs.get("alerts", alert_id)
        if doc is None:
            raise ProtocolError("not_found", "no such alert")
        return doc

    async def can_see(self, user: str, alert_id: str, moderator: bool) -> bool:
        """Location is for the owner, recipients, acknowledging responders and moderators."""
        if moderator:
            return True
        doc = await self.docs.get("alerts", alert_id)
        return doc is not None and (user == doc["owner"] or user in doc["users"])

    async def update(
        self, alert_id: str, change: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Compare-and-set loop: apply `change` to the freshest copy."""
        for _ in range(50):
            doc = await self.alert(alert_id)
            change(doc)
            if await self.docs.put("alerts", alert_id, doc, ix=doc.get("due"), version=doc["_v"]):
                doc["_v"] += 1
                return doc
        raise ProtocolError("unavailable", "the alert is too busy, retry")

    async def contacts(self, owner: str) -> list[dict[str, Any]]:
        doc = await self.docs.get("contacts", owner)
        return list(doc["contacts"]) if doc else []

    async def set_contacts(self, owner: str, contacts: list[dict[str, Any]]) -> None:
        await self.docs.put("contacts", owner, {"contacts": contacts})

    # --- the plan and its queue -------------------------------------------------------

    async def materialize(self, alert: dict[str, Any]) -> bool:
        """Make the queue match the plan: every unfinished job put on its route's queue (a
        no-op for a job still queued). Idempotent; True when every planned job is finished.
        (A recipient's delivery record is written by its first outcome; until then the plan
        alone says `queued`.)"""
        deliveries = await self.deliveries.of(alert["id"])
        pending = [
            (route, to, purpose)
            for route, to, purpose in alert.get("jobs", [])
            if not finished(deliveries.get((route, to)), purpose)
        ]
        for route, to, purpose in pending:
            await self.delivery.queues[route].put(
                job_key(alert["id"], route, to, purpose),
                {"alert_id": alert["id"], "route": route, "to": to, "purpose": purpose},
            )
        for route in {route for route, _, _ in pending}:
            self.delivery.wake(route)
        if alert["state"] == "active":
            await self.docs.insert("active_alerts", alert["id"], {"id": alert["id"]}, ix=0)
        elif not pending:
            await self.docs.delete("active_alerts", alert["id"])
        return not pending

    async def _finish(self, alert: dict[str, Any], what: str) -> None:
        """After a commit: queue the plan now rather than at the next reconcile. A failure
        here only delays delivery (the alert is due for reconciling), so it is logged."""
        try:
            await self.materialize(alert)
        except Exception as exc:
            log.warning(
                "alerts: %s stored, queueing deferred to the reconciler (%s)",
                what,
                type(exc).__name__,
            )

    async def _announce(self, target: str, push: dict[str, Any]) -> None:
        """A live push that nothing depends on (the durable routes carry the notice)."""
        try:
            await self._publish(target, push)
        except Exception as exc:
            log.warning("alerts: live push to %s not sent (%s)", target, type(exc).__name__)

    # --- ops --------------------------------------------------------------------------

    async def trigger(self, owner: str, frame: dict[str, Any]) -> dict[str, Any]:
        kind = frame.get("kind")
        if kind not in KINDS:
            raise ProtocolError("bad_request", f"'kind' must be one of {', '.join(sorted(KINDS))}")
        location = parse_location(frame.get("location"))
        note = frame.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            raise ProtocolError("bad_request", f"'note' must be a string of at most {MAX_NOTE}")
        cid = frame.get("client_alert_id")
        if not isinstance(cid, str) or not 1 <= len(cid) <= 64:
            raise ProtocolError("bad_request", "'client_alert_id' must be 1-64 characters")
        alert_id = alert_id_for(owner, cid)
        reply = {"alert_id": alert_id, "channel": f"alert:{alert_id}"}
        existing = await self.docs.get("alerts", alert_id)
        if existing is not None:  # a retry: finish what the first attempt may not have
            await self._finish(existing, "retried alert")
            self.metrics.triggers.labels("retried").inc()
            return {**reply, **({"warnings": warnings(existing)} if warnings(existing) else {})}
        try:
            await self._reserve(owner, alert_id)
        except ProtocolError:
            self.metrics.triggers.labels("refused").inc()
            raise
        self.checkpoint("trigger:reserved")
        contacts = await self.contacts(owner)
        tier1 = [c for c in contacts if c.get("tier", 1) == 1]
        responders = [u for u in await self._responders_near(location) if u != owner]
        now = now_ms()
        alert: dict[str, Any] = {
            "id": alert_id,
            "owner": owner,
            "kind": kind,
            "note": note,
            "location": location,
            "state": "active",
            "outcome": None,
            "created": now,
            "users": sorted({c["user"] for c in tier1 if "user" in c} | set(responders)),
            "responders": responders,
            "acked_by": [],
            "tier": 1,
            "escalations": 0,
            "next_escalation": now + int(self.settings.escalate_s * 1000),
            "jobs": plan(tier1, responders, "alert"),
        }
        alert["due"] = due(alert, self.settings.reconcile_s)
        raced = await self.docs.insert("alerts", alert_id, alert, ix=alert["due"])
        if raced is not None:  # a concurrent retry committed first: its alert stands
            await self._finish(raced, "retried alert")
            self.metrics.triggers.labels("retried").inc()
            return reply
        self.metrics.triggers.labels("created").inc()
        self.checkpoint("trigger:stored")
        await self._finish(alert, "alert")
        self.checkpoint("trigger:queued")
        try:  # the first point is also the alert's own location: the trail may miss it
            await self.docs.put("alert_trail", trail_key(alert_id, location), location, ix=now)
        except Exception as exc:
            log.warning("alerts: first trail point not stored (%s)", type(exc).__name__)
        if not alert["jobs"]:
            log.warning("alerts: an alert with no recipients (no contacts, no responders)")
        await self._announce("@moderators", alert_push(alert))
        return {**reply, **({"warnings": warnings(alert)} if warnings(alert) else {})}

    async def _responders_near(self, location: dict[str, Any]) -> list[str]:
        """Nearby responders, or none if their index cannot answer: an SOS to the contacts
        must not fail because the responder index is down."""
        try:
            return await self.responders.near(location, self.settings.responder_radius_m)
        except Exception as exc:
            log.warning("alerts: responder lookup failed (%s); contacts only", type(exc).__name__)
            return []

    async def _reserve(self, owner: str, alert_id: str) -> None:
        """Count this trigger against the owner's limit, cluster-wide (compare-and-set on
        the store), before anything of the alert is written. Idempotent per alert id: a retry
        whose first attempt got this far does not count twice."""
        limit = self.settings.trigger_limit
        for _ in range(50):
            doc = await self.docs.get("alert_quota", owner)
            now = now_ms()
            recent = [r for r in (doc or {}).get("recent", []) if now - r[0] < TRIGGER_WINDOW_MS]
            if any(r[1] == alert_id for r in recent):
                return
            if len(recent) >= limit:
                raise ProtocolError(
                    "rate_limited",
                    "too many alerts; call emergency services",
                    retry_after_ms=TRIGGER_WINDOW_MS - (now - recent[0][0]),
                )
            new = {"recent": [*recent, [now, alert_id]]}
            if doc is None:
                if await self.docs.insert("alert_quota", owner, new) is None:
                    return
            elif await self.docs.put("alert_quota", owner, new, version=doc["_v"]):
                return
        raise ProtocolError("unavailable", "too many concurrent alerts, retry")

    async def location(self, user: str, frame: dict[str, Any]) -> dict[str, Any]:
        alert = await self.alert(frame.get("alert_id"))
        if alert["owner"] != user:
            raise ProtocolError("forbidden", "only the alert's owner sends its location")
        if alert["state"] != "active":
            raise ProtocolError("conflict", "the alert is resolved")
        location = parse_location(frame.get("location"))

        def change(doc: dict[str, Any]) -> None:
            if location["ts"] >= doc["location"].get("ts", 0):  # a late retry never rewinds
                doc["location"] = location

        # The trail point's key is a function of the point: a retry writes it again, not twice.
        await self.docs.put(
            "alert_trail", trail_key(alert["id"], location), location, ix=location["ts"]
        )
        await self.update(alert["id"], change)
        await self._publish(
            f"alert:{alert['id']}",
            {"push": "alert.location", "alert_id": alert["id"], "location": location},
        )
        return {"alert_id": alert["id"]}

    async def ack(self, user: str, frame: dict[str, Any]) -> dict[str, Any]:
        alert = await self.alert(frame.get("alert_id"))
        if user not in alert["users"]:
            raise ProtocolError("forbidden", "you were not alerted")

        def change(doc: dict[str, Any]) -> None:
            if user not in doc["acked_by"]:
                doc["acked_by"].append(user)
            doc["next_escalation"] = None  # someone is on it

        def acked(doc: dict[str, Any]) -> None:
            doc["status"] = "acked"

        alert = await self.update(alert["id"], change)
        planned = {(route, to) for route, to, _ in alert.get("jobs", [])}
        for route in ("ws", "push"):
            if (route, user) in planned:
                await self.deliveries.update(alert["id"], route, user, acked)
        push = {"push": "alert.ack", "alert_id": alert["id"], "user": user}
        await self._publish(f"user:{alert['owner']}", push)
        await self._publish(f"alert:{alert['id']}", push)
        return {"alert_id": alert["id"]}

    async def resolve(self, user: str, moderator: bool, frame: dict[str, Any]) -> dict[str, Any]:
        alert = await self.alert(frame.get("alert_id"))
        if alert["owner"] != user and not moderator:
            raise ProtocolError("forbidden", "only the owner or a moderator resolves an alert")
        outcome = frame.get("outcome")
        if outcome not in OUTCOMES:
            raise ProtocolError(
                "bad_request", f"'outcome' must be one of {', '.join(sorted(OUTCOMES))}"
            )
        reply = {"alert_id": alert["id"], "state": "resolved"}
        if alert["state"] == "resolved":  # a retry: finish queueing the notices
            await self._finish(alert, "resolve")
            return reply

        def change(doc: dict[str, Any]) -> None:
            if doc["state"] == "resolved":
                return
            # Everyone alerted hears it, on every route they were alerted through (the
            # worker skips those the alert never reached).
            routes = dict.fromkeys((r, t) for r, t, p in doc.get("jobs", []) if p != "resolve")
            doc.update(
                state="resolved",
                outcome=outcome,
                resolved=now_ms(),
                resolved_by=user,
                next_escalation=None,
                jobs=[*doc.get("jobs", []), *([r, t, "resolve"] for r, t in routes)],
            )
            doc["due"] = due(doc, self.settings.reconcile_s)

        alert = await self.update(alert["id"], change)
        self.checkpoint("resolve:stored")
        await self._finish(alert, "resolve")
        push = {"push": "alert.resolved", "alert_id": alert["id"], "outcome": alert["outcome"]}
        await self._announce(f"alert:{alert['id']}", push)
        await self._announce(
            "@moderators", {**alert_push(alert, with_location=False), "outcome": alert["outcome"]}
        )
        return reply

    async def status(self, user: str, moderator: bool, frame: dict[str, Any]) -> dict[str, Any]:
        alert = await self.alert(frame.get("alert_id"))
        if alert["owner"] != user and not moderator:
            raise ProtocolError("forbidden", "only the owner or a moderator sees the status")
        deliveries = await self.deliveries.of(alert["id"])
        for route, to, _ in alert.get("jobs", []):  # planned, no outcome yet
            deliveries.setdefault((route, to), new_delivery(route, to))
        return {
            "alert_id": alert["id"],
            "state": alert["state"],
            "outcome": alert["outcome"],
            "recipients": [recipient_view(d) for d in deliveries.values()],
            "warnings": warnings(alert),
        }

    async def active(self) -> list[dict[str, Any]]:
        """Active alerts with their latest location and delivery status (moderators)."""
        out = []
        for key, _ in await self.docs.below("active_alerts", 2**62, 500):
            doc = await self.docs.get("alerts", key)
            if doc is None or doc["state"] != "active":
                continue
            status = await self.status(doc["owner"], True, {"alert_id": doc["id"]})
            out.append(
                {
                    "alert_id": doc["id"],
                    "owner": doc["owner"],
                    "kind": doc["kind"],
                    "note": doc.get("note"),
                    "location": doc["location"],
                    "created": doc["created"],
                    "acked_by": doc["acked_by"],
                    "recipients": status["recipients"],
                    "warnings": status["warnings"],
                }
            )
        return out

    async def share_location(self, user: str, frame: dict[str, Any]) -> dict[str, Any]:
        location = parse_location(frame.get("location"))
        await self.responders.share(user, location)
        return {"expires_in_s": int(self.settings.responder_ttl_s)}

    async def provider_status(self, provider_id: str, status: str) -> bool:
        return await self.delivery.provider_status(provider_id, status)
