"""Delivery workers: one pool per route (ws, push, sms), each on its own queue, so a provider
that hangs or throttles holds up only its own route. Every provider call is bounded by
`provider_timeout_s`; failures retry with exponential backoff and jitter (never sooner than the
provider's Retry-After) and are dead-lettered as `failed` after `max_attempts`.

Exactly-once towards a provider holds except in one window: a provider that accepted a request
whose result was not yet written (`sent`) when the worker died or the store failed sends again
when the job is re-run. Neither Twilio's Messages API nor FCM's v1 send takes an idempotency
key; FCM's collapse key (`alert-<id>`) and APNs' collapse id make a repeated push replace the
first on the device, a repeated SMS is a second text.

Each route's status says only what the server can prove (`alerts.records.advance`): `sent` when
the provider (for WebSocket: the broker, while the user had a connection) took it, `outbox`
when it only went to the development outbox, `delivered` when the app says it has it
(`alerts.receipts`) or the carrier does (Twilio's callback). A contact with the app and a phone
whose app has not confirmed in time gets the SMS (`alerts.fallback`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from realtime_safety.storage import DocStore, StoreUnavailable

from .fallback import Fallbacks
from .metrics import AlertMetrics
from .model import now_ms
from .providers import APNS_LEVELS, Notice, ProviderError, PushProvider, SmsProvider
from .queue import Job, JobQueue
from .receipts import Receipts
from .records import Deliveries, advance, finished, job_key, mark
from .views import still_reaches

log = logging.getLogger("realtime.alerts")

ROUTES = ("ws", "push", "sms")

# (user channel or alert channel, push dict) -> published to the node's hub
Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
IsOnline = Callable[[str], Awaitable[bool]]


class NotYet(Exception):
    """The job must wait for another one (a resolve notice for an alert notice in flight)."""


@dataclass(frozen=True)
class DeliverySettings:
    max_attempts: int = 6
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    retry_after_max_s: float = 600.0  # a provider's Retry-After is honoured up to this
    push_ttl_s: int = 3600
    public_url: str | None = None  # for Twilio status callbacks
    workers: int = 4  # per route
    lease_s: float = 30.0
    provider_timeout_s: float = 10.0
    # A contact with a phone whose app has not confirmed a notice (alert.received, alert.ack)
    # this long after its first WebSocket/push send gets the SMS; 0 turns the fallback off.
    fallback_s: float = 30.0
    fallback_tier_s: Mapping[int, float] = field(default_factory=dict)  # a tier's own delay
    # The APNs interruption level of alert notices (see providers.Notice): "active",
    # "time-sensitive" (needs the app's capability) or "critical" (needs Apple's entitlement).
    apns_level: str = "time-sensitive"
    monitor_s: float = 5.0  # how often the queues' backlog is measured for /metrics

    def __post_init__(self) -> None:
        if self.apns_level not in APNS_LEVELS:
            raise ValueError(f"apns_level must be one of {', '.join(APNS_LEVELS)}")


def alert_push(alert: dict[str, Any], *, with_location: bool = True) -> dict[str, Any]:
    return {
        "push": "alert",
        "alert_id": alert["id"],
        "kind": alert["kind"],
        "user": alert["owner"],
        "location": alert["location"] if with_location else None,
        "note": alert.get("note"),
        "channel": f"alert:{alert['id']}",
        "state": alert["state"],
        "duress": bool(alert.get("duress")),  # stopped with the duress PIN: treat as active
    }


class Deliverer:
    def __init__(
        self,
        docs: DocStore,
        queues: dict[str, JobQueue],
        push: PushProvider,
        sms: SmsProvider,
        publish: Publish,
        is_online: IsOnline,
        settings: DeliverySettings,
        node_id: str,
        checkpoint: Callable[[str], None],
        metrics: AlertMetrics,
    ) -> None:
        self.metrics = metrics
        self.docs = docs
        self.deliveries = Deliveries(docs)
        self.queues = queues
        self.push = push
        self.sms = sms
        self._publish = publish
        self._is_online = is_online
        self.settings = settings
        self._node = node_id
        self._checkpoint = checkpoint
        self._wake = {route: asyncio.Event() for route in ROUTES}
        self.receipts = Receipts(docs, metrics)
        self.fallbacks = Fallbacks(
            docs,
            self._queue_sms,
            metrics,
            after_s=settings.fallback_s,
            lease_s=settings.lease_s,
            tier_s=settings.fallback_tier_s,
        )

    def tasks(self) -> list[asyncio.Task[None]]:
        return [
            *(
                asyncio.create_task(self._worker(route, f"{self._node}-{route}-{i}"), name=name)
                for route in ROUTES
                for i in range(self.settings.workers)
                for name in (f"alert-{route}-worker-{i}",)
            ),
            self.fallbacks.task(),
            asyncio.create_task(self._monitor(), name="alert-queue-monitor"),
        ]

    def wake(self, route: str) -> None:
        self._wake[route].set()

    async def _queue_sms(self, alert_id: str, phone: str, purpose: str) -> None:
        data = {"alert_id": alert_id, "route": "sms", "to": phone, "purpose": purpose}
        await self.queues["sms"].put(job_key(alert_id, "sms", phone, purpose), data)
        self.wake("sms")

    async def ready(self) -> bool:
        """Whether alerts can be queued now: every route's queue answers."""
        answers = await asyncio.gather(*(q.ping() for q in self.queues.values()))
        return all(answers)

    async def measure(self) -> None:
        """The queues' backlog and reachability into the gauges /metrics shows."""
        m = self.metrics
        for route, queue in self.queues.items():
            up = await queue.ping()
            m.queue_up.labels(route).set(1 if up else 0)
            if not up:
                continue
            async with asyncio.timeout(5):
                backlog = await queue.backlog()
            m.queue_lag_seconds.labels(route).set(backlog.lag_ms / 1000)
            m.oldest_unsent_seconds.labels(route).set(backlog.oldest_ms / 1000)
            m.queue_jobs.labels(route).set(backlog.jobs)

    async def _monitor(self) -> None:
        purged = 0.0
        while True:
            try:
                await self.measure()
                if time.monotonic() - purged > 3600:  # status callbacks kept for two days
                    await self.receipts.purge(2 * 86_400_000)
                    purged = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alerts: queue measurement failed (%s)", type(exc).__name__)
            await asyncio.sleep(self.settings.monitor_s)

    async def close(self) -> None:
        for closer in (*(q.close for q in self.queues.values()), self.push.close, self.sms.close):
            try:
                await closer()
            except Exception as exc:
                log.warning("alerts: close failed: %s", exc)

    async def _worker(self, route: str, consumer: str) -> None:
        queue, wake = self.queues[route], self._wake[route]
        while True:
            try:
                jobs = await queue.take(consumer, 10, self.settings.lease_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alerts: %s queue unavailable (%s)", route, type(exc).__name__)
                await asyncio.sleep(1)
                continue
            if not jobs:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), 0.25)
                except TimeoutError:
                    pass
                continue
            await asyncio.gather(*(self._run(queue, job) for job in jobs))

    async def _run(self, queue: JobQueue, job: Job) -> None:
        """Never raises: a job whose outcome cannot be written stays leased and comes back."""
        try:
            try:
                await self._deliver(job)
            except NotYet:
                await queue.retry(job, now_ms() + 1000, count=False)
                return
            except ProviderError as exc:
                await self._failed(queue, job, str(exc), exc.permanent, exc.retry_after_s)
                return
            except (StoreUnavailable, OSError, TimeoutError) as exc:
                await self._failed(queue, job, type(exc).__name__, False, None)
                return
            except Exception:
                log.exception("alerts: delivery job failed unexpectedly")
                await self._failed(queue, job, "internal", False, None)
                return
            await queue.done(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "alerts: %s job outcome not recorded (%s); it runs again after its lease",
                job.data.get("route"),
                type(exc).__name__,
            )

    async def _failed(
        self, queue: JobQueue, job: Job, error: str, permanent: bool, hint: float | None
    ) -> None:
        data = job.data
        attempts = job.attempts + 1
        final = permanent or attempts >= self.settings.max_attempts
        purpose = data["purpose"]

        def change(doc: dict[str, Any]) -> None:
            if purpose != "resolve":
                doc["attempts"] = doc.get("attempts", 0) + 1
                doc["error"] = error
            else:  # the alert notice's status stands; the "resolved" notice has its own
                doc["resolve_error"] = error
            if final:
                mark(purpose, "dead")(doc)
                if purpose != "resolve" and not doc.get("sent"):
                    advance(doc, "failed")

        await self.deliveries.update(data["alert_id"], data["route"], data["to"], change)
        self.metrics.deliveries.labels(data["route"], "failed" if final else "retry").inc()
        if final:
            log.warning(
                "alerts: %s delivery dead-lettered after %d attempts: %s",
                data["route"],
                attempts,
                error,
            )
            await queue.done(job)
            return
        delay = min(self.settings.retry_max_s, self.settings.retry_base_s * 2**job.attempts)
        delay *= 0.5 + random.random()
        if hint is not None:
            delay = max(delay, min(hint, self.settings.retry_after_max_s))
        await queue.retry(job, now_ms() + int(delay * 1000))

    async def _deliver(self, job: Job) -> None:
        data = job.data
        route, to, purpose = data["route"], data["to"], data["purpose"]
        alert, delivery = await asyncio.gather(
            self.docs.get("alerts", data["alert_id"]),
            self.deliveries.get(data["alert_id"], route, to),
        )
        if alert is None:
            return  # jobs exist only for stored alerts: nothing to do
        if finished(delivery, purpose):  # before a crash kept the job from being marked done
            if delivery is not None and delivery.get("provider_id") and purpose != "resolve":
                await self._settle(delivery["provider_id"])  # the crash may have come first
            return
        if not await still_reaches(self.docs, alert, route, to):
            # a contact the owner removed since: nothing more of the alert goes to them
            await self.deliveries.update(alert["id"], route, to, _cancelled(purpose))
            self.metrics.deliveries.labels(route, "cancelled").inc()
            return
        if purpose != "resolve" and alert["state"] == "resolved":
            await self.deliveries.update(alert["id"], route, to, _cancelled(purpose))
            self.metrics.deliveries.labels(route, "cancelled").inc()
            return  # resolved before this went out: nobody needs it now
        if purpose == "resolve":
            earlier = [p for r, t, p in alert["jobs"] if (r, t) == (route, to) and p != "resolve"]
            if not all(finished(delivery, p) for p in earlier):
                raise NotYet  # an alert notice may be in flight: tell them after it
            if delivery is None or not delivery.get("sent"):
                await self.deliveries.update(alert["id"], route, to, mark(purpose, "skipped"))
                self.metrics.deliveries.labels(route, "skipped").inc()
                return  # never reached: no update to give
        if route in ("ws", "push") and purpose != "resolve":
            await self.fallbacks.arm(alert, to, purpose)  # before the send (see fallback)
        first = delivery is None or not delivery.get("attempts")
        if purpose == "alert" and first and not (delivery or {}).get("fallback_for"):
            # from when it was to go out: a cancel window's wait is the owner's, not ours
            since = alert.get("notify_at", alert["created"])
            self.metrics.trigger_to_provider_seconds.labels(route).observe(
                max(0.0, (now_ms() - since) / 1000)
            )
        try:
            with self.metrics.provider_seconds.labels(route).time():
                async with asyncio.timeout(self.settings.provider_timeout_s):
                    status, provider_id = await self._send(alert, route, to, purpose)
        except TimeoutError:
            raise ProviderError(
                f"{route}: no answer in {self.settings.provider_timeout_s:g} s"
            ) from None
        self._checkpoint("deliver:sent")

        def change(doc: dict[str, Any]) -> None:
            mark(purpose, "sent")(doc)
            if purpose != "resolve":
                doc["attempts"] = doc.get("attempts", 0) + 1
                doc["error"] = None
                if provider_id is not None:
                    doc["provider_id"] = provider_id
                advance(doc, status)

        await self.deliveries.update(alert["id"], route, to, change)
        self.metrics.deliveries.labels(route, status).inc()
        if provider_id is not None and purpose != "resolve":
            await self._settle(provider_id)

    async def _send(
        self, alert: dict[str, Any], route: str, to: str, purpose: str
    ) -> tuple[str, str | None]:
        if route == "ws":
            push = (
                alert_push(alert)
                if purpose != "resolve"
                else {
                    "push": "alert.resolved",
                    "alert_id": alert["id"],
                    "outcome": alert["outcome"],
                }
            )
            await self._publish(f"user:{to}", push)
            # Published on user:<id>: whether a connection there has it, only the app's
            # receipt says; with no connection at all, nobody does (`offline`) — but an
            # invisible user is never shown offline (`is_online`), that would give them away.
            return ("sent" if await self._is_online(to) else "offline"), None
        if route == "push":
            return await self._send_push(alert, to, purpose), None
        provider_id = await self._send_sms(alert, to, purpose)
        return ("outbox" if self.sms.outbox else "sent"), provider_id

    async def _send_push(self, alert: dict[str, Any], user: str, purpose: str) -> str:
        tokens = [d["token"] for d in await self.docs.prefix("push_tokens", f"{user}|", 50)]
        if not tokens:
            raise ProviderError("no push token registered", permanent=True)
        data = {
            "type": "alert" if purpose != "resolve" else "alert.resolved",
            "alert_id": alert["id"],
            "kind": alert["kind"],
            "user": alert["owner"],
            "state": alert["state"],
            "escalation": str(alert.get("escalations", 0)),
            "duress": "1" if alert.get("duress") else "0",
        }
        if purpose != "resolve":
            data.update(lat=str(alert["location"]["lat"]), lon=str(alert["location"]["lon"]))
        results = await self.push.send(
            tokens,
            data,
            collapse_key=f"alert-{alert['id']}",
            ttl_s=self.settings.push_ttl_s,
            notice=self._notice(alert, purpose),
        )
        for r in results:
            if r.unregistered:
                await self.docs.delete("push_tokens", f"{user}|{r.token}")
        if any(r.ok for r in results):
            return "outbox" if self.push.outbox else "sent"
        if all(r.unregistered for r in results):
            raise ProviderError("every push token was unregistered", permanent=True)
        hints = [r.retry_after_s for r in results if r.retry_after_s is not None]
        raise ProviderError(
            f"push failed: {results[0].error}", retry_after_s=max(hints) if hints else None
        )

    def _notice(self, alert: dict[str, Any], purpose: str) -> Notice:
        """What the phone shows by itself (no location: it is shown on a locked screen)."""
        if purpose == "resolve":
            body = f"{alert['owner']}'s alert is resolved ({alert['outcome']})."
            return Notice("Alert resolved", body, "active")
        body = f"{alert['owner']} needs help ({alert['kind']}). Open the app to respond."
        return Notice("Emergency alert", body, self.settings.apns_level)

    async def _send_sms(self, alert: dict[str, Any], phone: str, purpose: str) -> str:
        loc = alert["location"]
        if purpose == "resolve":
            body = f"Update: {alert['owner']}'s alert is resolved ({alert['outcome']})."
        else:
            body = (
                f"EMERGENCY ({alert['kind']}): {alert['owner']} needs help. "
                f"Location: https://maps.google.com/?q={loc['lat']:.6f},{loc['lon']:.6f}"
                + (f" Note: {alert['note']}" if alert.get("note") else "")
            )
        callback = (
            f"{self.settings.public_url.rstrip('/')}/v1/twilio/status"
            if self.settings.public_url
            else None
        )
        return await self.sms.send(phone, body, callback)

    async def _settle(self, provider_id: str) -> None:
        """Apply a status callback that came before the message id was written (only asked
        for, so only possible, with a public URL)."""
        if self.settings.public_url:
            await self.receipts.settle(provider_id)

    async def provider_status(
        self, provider_id: str, status: str, error_code: str | None = None
    ) -> bool:
        """A provider's status callback (Twilio), folded into the delivery record."""
        return await self.receipts.provider_status(provider_id, status, error_code)


def _cancelled(purpose: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        mark(purpose, "skipped")(doc)
        advance(doc, "cancelled")

    return change
