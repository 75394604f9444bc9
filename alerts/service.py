"""Safety alerts (docs/protocol-v1.md section 7): trigger, live location, ack, resolve, status,
responders' shared locations, escalation, and the reconciler that keeps deliveries going.

Records (in the store's small-document collections, so in SQLite or MongoDB):
- `alerts` key alert id, ix = `due`, the next time a node must look at the alert (to finish
  queueing its plan, or to escalate); the record holds the plan (`jobs`, see `alerts.records`);
- `alert_quota` key owner -> the owner's recent triggers (the cluster-wide trigger limit);
- `active_alerts` key alert id (the moderators' list);
- `alert_trail` key "alert id|ts|digest", ix = ts (purged after RT_ALERT_TRAIL_DAYS);
- `deliveries` key "alert id|route|to", ix = the provider's message id (status webhooks);
- `contacts` key owner -> tiers of emergency contacts; `push_tokens` key "user|token";
- `pins`, `pin_attempts` (alerts.pins); `checkins`, `checkin_users` (alerts.checkin).

A trigger is all-or-nothing: the alert id is derived from (owner, client_alert_id), the limit is
checked (and the slot reserved for that id) before anything else is written, and the alert is
stored with its whole plan in one insert — the commit point. An `ok` is sent only after it. A
retry finds the stored alert and finishes whatever the first attempt did not (deliveries
records, queue jobs), and so does any node's reconciler once the alert comes due, so a node
killed at any step, a store timeout or a queue that lost its data delays a notification but
never loses it. Escalation steps and resolve append to the plan in the same compare-and-set
write that changes the alert, so they follow the same rule. A trigger with `delay_s` holds the
plan until its countdown ends (alerts.cancel); what the owner may see goes through
alerts.views.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from realtime_safety.protocol import ProtocolError
from realtime_safety.storage import DocStore

from . import cancel, views
from .checkin import CheckinService, CheckinSettings
from .delivery import Deliverer, DeliverySettings, IsOnline, Publish
from .lane import Lane
from .metrics import AlertMetrics
from .model import now_ms, parse_location
from .pins import Pins
from .plan import alert_id_for, due, parse_trigger, plan, trail_key
from .providers import PushProvider, SmsProvider
from .queue import JobQueue
from .quota import Quota
from .reconcile import Reconciler
from .records import Deliveries, finished, job_key
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
    max_delay_s: float = 60.0  # the longest cancel window (`delay_s`)
    pin_attempts: int = 5  # wrong PINs per user per 10 minutes
    pin_pepper: bytes = b""  # a server-side secret mixed into PIN hashes (alerts.pins)
    checkin: CheckinSettings = field(default_factory=CheckinSettings)


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
        # The service runs on its own lane (alerts.lane); the node's callbacks run on the node's.
        self.lane = Lane("alerts")
        publish, is_online = self.lane.back(publish), self.lane.back(is_online)
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
        self._background: set[asyncio.Task[None]] = set()
        self.reconciler = Reconciler(self)
        self.quota = Quota(docs, settings.trigger_limit)
        self.pins = Pins(docs, attempts=settings.pin_attempts, pepper=settings.pin_pepper)
        self.checkins = CheckinService(self, settings.checkin)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers and timers, on the lane once the node has started it."""
        await self.lane.run(self._start())

    async def stop(self) -> None:
        await self.lane.run(self._stop())

    async def _start(self) -> None:
        self._tasks += self.delivery.tasks()
        self._tasks += self.reconciler.tasks()
        self._tasks += self.checkins.tasks()
        for provider, what in (
            (self.delivery.push, "push notifications"),
            (self.delivery.sms, "SMS"),
        ):
            if provider.name.startswith("outbox"):
                log.warning("alerts: no credentials: %s are written to the %s", what, provider.name)

    async def _stop(self) -> None:
        self.reconciler.cancel_timers()
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
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

    async def can_see(
        self, user: str, alert_id: str, moderator: bool, responder: bool = True
    ) -> bool:
        """Location is for the owner, recipients (a responder while still one) and moderators."""
        return await views.can_see(self, user, alert_id, moderator, responder)

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
        return await views.contacts_of(self.docs, owner)

    async def set_contacts(self, owner: str, contacts: list[dict[str, Any]]) -> list[str]:
        """Replace the owner's contacts; the users no longer among them (who lose their access
        to the owner's alerts: `views.still_alerted`)."""
        before = {c["user"] for c in await self.contacts(owner) if "user" in c}
        await self.docs.put("contacts", owner, {"contacts": contacts})
        return sorted(before - {c["user"] for c in contacts if "user" in c})

    # --- the plan and its queue -------------------------------------------------------

    async def materialize(self, alert: dict[str, Any], *, new: bool = False) -> bool:
        """Make the queue match the plan: every unfinished job put on its route's queue (a
        no-op for a job still queued). Idempotent; True when every planned job is finished.
        (A recipient's delivery record is written by its first outcome; until then the plan
        alone says `queued`: so a `new` alert, just stored, has none to read.) A plan held by
        its countdown is not queued; a cancelled one never."""
        if alert["state"] in ("countdown", "cancelled"):
            return bool(alert["state"] == "cancelled")
        deliveries = {} if new else await self.deliveries.of(alert["id"])
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

    async def finish(self, alert: dict[str, Any], what: str, *, new: bool = False) -> None:
        """After a commit: queue the plan now rather than at the next reconcile. A failure
        here only delays delivery (the alert is due for reconciling), so it is logged."""
        try:
            await self.materialize(alert, new=new)
        except Exception as exc:
            log.warning(
                "alerts: %s stored, queueing deferred to the reconciler (%s)",
                what,
                type(exc).__name__,
            )

    async def announce(self, target: str, push: dict[str, Any]) -> None:
        """A live push that nothing depends on (the durable routes carry the notice)."""
        try:
            await self._publish(target, push)
        except Exception as exc:
            log.warning("alerts: live push to %s not sent (%s)", target, type(exc).__name__)

    async def live(self, alert: dict[str, Any], push: dict[str, Any], *, owner: bool) -> None:
        """A live push of the alert: on `alert:<id>` (and to the owner's `user:` channel when
        `owner`); for an alert whose owner is shown something else (the duress PIN), to the
        people alerted on their own `user:` channels only."""
        if alert.get("shown"):
            users = [u for u in alert["users"] if await views.still_alerted(self.docs, alert, u)]
            targets = [f"user:{u}" for u in users if u != alert["owner"]]
        else:
            targets = [f"alert:{alert['id']}", *([f"user:{alert['owner']}"] if owner else [])]
        for target in targets:
            await self._publish(target, push)

    def background(self, work: Any, name: str) -> None:
        """Work after an answer (a failure is logged; the `due` index makes up for it)."""
        task: asyncio.Task[None] = asyncio.create_task(work, name=f"alerts-{name}")
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("alerts: %s failed (%r)", task.get_name(), task.exception())

    # --- ops --------------------------------------------------------------------------

    async def trigger(self, owner: str, frame: dict[str, Any]) -> dict[str, Any]:
        fields, cid, delay = parse_trigger(frame, self.settings.max_delay_s)
        alert_id = alert_id_for(owner, cid)
        existing = await self.docs.get("alerts", alert_id)
        if existing is not None:  # a retry: finish what the first attempt may not have
            await self.finish(existing, "retried alert")
            self.metrics.triggers.labels("retried").inc()
            return views.trigger_reply(existing)
        hold = delay > 0 and await self.pins.has_pin(owner)
        alert = await self.create(owner, alert_id, fields, hold_ms=int(delay * 1000) if hold else 0)
        reply = views.trigger_reply(alert)
        if delay > 0 and not hold:
            # no window without a PIN to close it
            reply["warnings"] = [*reply.get("warnings", []), "no_pin"]
        return reply

    async def create(
        self,
        owner: str,
        alert_id: str,
        fields: dict[str, Any],
        *,
        hold_ms: int = 0,
        force: bool = False,
    ) -> dict[str, Any]:
        """Store a new alert with its whole plan (the commit point), then queue it — or hold it
        for `hold_ms` (a countdown). `fields`: kind, note, location and any extra. `force`:
        counted against the owner's limit but never refused (an alert the server raises)."""
        try:  # the contacts are read meanwhile: one wait instead of two
            _, contacts = await asyncio.gather(
                self.quota.reserve(owner, alert_id, force=force), self.contacts(owner)
            )
        except ProtocolError:
            self.metrics.triggers.labels("refused").inc()
            raise
        self.checkpoint("trigger:reserved")
        tier1 = [c for c in contacts if c.get("tier", 1) == 1]
        responders = [u for u in await self._responders_near(fields["location"]) if u != owner]
        now = now_ms()
        notify_at = now + hold_ms
        alert: dict[str, Any] = {
            "id": alert_id,
            "owner": owner,
            **fields,
            "state": "countdown" if hold_ms else "active",
            "outcome": None,
            "created": now,
            "notify_at": notify_at,
            "users": sorted({c["user"] for c in tier1 if "user" in c} | set(responders)),
            "responders": responders,
            "acked_by": [],
            "tier": 1,
            "escalations": 0,
            "next_escalation": notify_at + int(self.settings.escalate_s * 1000),
            "jobs": plan(tier1, responders, "alert"),
        }
        alert["due"] = due(alert, self.settings.reconcile_s)
        raced = await self.docs.insert("alerts", alert_id, alert, ix=alert["due"])
        if raced is not None:  # a concurrent retry committed first: its alert stands
            await self.finish(raced, "retried alert")
            self.metrics.triggers.labels("retried").inc()
            return raced
        self.metrics.triggers.labels("created").inc()
        self.checkpoint("trigger:stored")
        await self.finish(alert, "alert", new=True)
        self.checkpoint("trigger:queued")
        try:  # the first point is also the alert's own location: the trail may miss it
            point = alert["location"]
            await self.docs.put("alert_trail", trail_key(alert_id, point), point, ix=point["ts"])
        except Exception as exc:
            log.warning("alerts: first trail point not stored (%s)", type(exc).__name__)
        if not alert["jobs"]:
            log.warning("alerts: an alert with no recipients (no contacts, no responders)")
        if hold_ms:
            self.reconciler.at(notify_at, alert_id)
        else:
            await self.announce("@moderators", cancel.moderators_push(alert))
        return alert

    async def _responders_near(self, location: dict[str, Any]) -> list[str]:
        """Nearby responders, or none if their index cannot answer: an SOS to the contacts
        must not fail because the responder index is down."""
        try:
            return await self.responders.near(location, self.settings.responder_radius_m)
        except Exception as exc:
            log.warning("alerts: responder lookup failed (%s); contacts only", type(exc).__name__)
            return []

    async def location(self, user: str, frame: dict[str, Any]) -> dict[str, Any]:
        alert = await self.alert(frame.get("alert_id"))
        if alert["owner"] != user:
            raise ProtocolError("forbidden", "only the alert's owner sends its location")
        view = views.owner_view(alert)
        if view is None:
            raise ProtocolError("not_found", "no such alert")
        if view["state"] == "resolved":
            raise ProtocolError("conflict", "the alert is resolved")
        location = parse_location(frame.get("location"))
        if alert["state"] in ("countdown", "active"):  # cancelled: kept nowhere (same answer)
            await self.follow(alert["id"], location)
        return {"alert_id": alert["id"]}

    async def follow(self, alert_id: str, location: dict[str, Any]) -> None:
        """A new point of the owner's: on the trail, the alert's location, pushed live."""

        def change(doc: dict[str, Any]) -> None:
            if location["ts"] >= doc["location"].get("ts", 0):  # a late retry never rewinds
                doc["location"] = location

        alert = await self.docs.get("alerts", alert_id)
        if alert is None or alert["state"] not in ("countdown", "active"):
            return
        # The trail point's key is a function of the point: a retry writes it again, not twice.
        await self.docs.put(
            "alert_trail", trail_key(alert_id, location), location, ix=location["ts"]
        )
        alert = await self.update(alert_id, change)
        push = {"push": "alert.location", "alert_id": alert_id, "location": location}
        await self.live(alert, push, owner=False)

    async def ack(
        self, user: str, frame: dict[str, Any], *, responder: bool = True
    ) -> dict[str, Any]:
        alert = await self.alert(frame.get("alert_id"))
        hidden = user == alert["owner"] and views.owner_view(alert) is None
        if not views.notified(alert) or hidden:
            raise ProtocolError("not_found", "no such alert")  # held or cancelled: not theirs
        if not await views.still_alerted(self.docs, alert, user, responder=responder):
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
        await self.live(alert, push, owner=True)
        return {"alert_id": alert["id"]}

    async def resolve(self, user: str, moderator: bool, frame: dict[str, Any]) -> dict[str, Any]:
        return await cancel.resolve(self, user, moderator, frame)

    async def cancel(self, owner: str, frame: dict[str, Any]) -> dict[str, Any]:
        return await cancel.cancel(self, owner, frame)

    async def status(self, user: str, moderator: bool, frame: dict[str, Any]) -> dict[str, Any]:
        return await views.status(self, user, moderator, frame)

    async def active(self) -> list[dict[str, Any]]:
        """Active alerts with their latest location and delivery status (moderators)."""
        return await views.active(self)

    async def trail(
        self, user: str, moderator: bool, frame: dict[str, Any], *, responder: bool = True
    ) -> dict[str, Any]:
        return await views.trail(self, user, moderator, frame, responder=responder)

    async def share_location(self, user: str, frame: dict[str, Any]) -> dict[str, Any]:
        location = parse_location(frame.get("location"))
        await self.responders.share(user, location)
        return {"expires_in_s": int(self.settings.responder_ttl_s)}

    async def provider_status(self, provider_id: str, status: str) -> bool:
        return await self.delivery.provider_status(provider_id, status)
