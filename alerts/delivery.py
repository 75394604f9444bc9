"""Delivery workers: one pool per route (ws, push, sms), each on its own queue, so a provider
that hangs or throttles holds up only its own route. Every provider call is bounded by
`provider_timeout_s`; failures retry with exponential backoff and jitter (never sooner than the
provider's Retry-After) and are dead-lettered as `failed` after `max_attempts`.

Exactly-once towards a provider holds except in one window: a provider that accepted a request
whose result was not yet written (`sent`) when the worker died or the store failed sends again
when the job is re-run. Neither Twilio's Messages API nor FCM's v1 send takes an idempotency
key; FCM's collapse key (`alert-<id>`) and APNs' collapse id make a repeated push replace the
first on the device, a repeated SMS is a second text.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from realtime_safety.storage import DocStore, StoreUnavailable

from .metrics import AlertMetrics
from .model import now_ms
from .providers import ProviderError, PushProvider, SmsProvider
from .queue import Job, JobQueue
from .records import Deliveries, finished, mark

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

    def tasks(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._worker(route, f"{self._node}-{route}-{i}"), name=name)
            for route in ROUTES
            for i in range(self.settings.workers)
            for name in (f"alert-{route}-worker-{i}",)
        ]

    def wake(self, route: str) -> None:
        self._wake[route].set()

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
            if final:
                mark(purpose, "dead")(doc)
                if purpose != "resolve" and not doc.get("sent") and doc["status"] != "acked":
                    doc["status"] = "failed"

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
        alert = await self.docs.get("alerts", data["alert_id"])
        if alert is None:
            return  # jobs exist only for stored alerts: nothing to do
        route, to, purpose = data["route"], data["to"], data["purpose"]
        delivery = await self.deliveries.get(alert["id"], route, to)
        if finished(delivery, purpose):
            return  # finished before a crash kept the job from being marked done
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
        if purpose == "alert" and (delivery is None or not delivery.get("attempts")):
            self.metrics.trigger_to_provider_seconds.labels(route).observe(
                max(0.0, (now_ms() - alert["created"]) / 1000)
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
                if doc["status"] != "acked":
                    doc["status"] = status

        await self.deliveries.update(alert["id"], route, to, change)
        self.metrics.deliveries.labels(route, status).inc()

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
            return ("delivered" if await self._is_online(to) else "sent"), None
        if route == "push":
            return await self._send_push(alert, to, purpose), None
        return "sent", await self._send_sms(alert, to, purpose)

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
        }
        if purpose != "resolve":
            data.update(lat=str(alert["location"]["lat"]), lon=str(alert["location"]["lon"]))
        results = await self.push.send(
            tokens, data, collapse_key=f"alert-{alert['id']}", ttl_s=self.settings.push_ttl_s
        )
        for r in results:
            if r.unregistered:
                await self.docs.delete("push_tokens", f"{user}|{r.token}")
        if any(r.ok for r in results):
            return "sent"
        if all(r.unregistered for r in results):
            raise ProviderError("every push token was unregistered", permanent=True)
        hints = [r.retry_after_s for r in results if r.retry_after_s is not None]
        raise ProviderError(
            f"push failed: {results[0].error}", retry_after_s=max(hints) if hints else None
        )

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

    async def provider_status(self, provider_id: str, status: str) -> bool:
        """A provider's status callback (Twilio): fold it into the delivery record."""
        mapped = {
            "delivered": "delivered",
            "read": "delivered",
            "failed": "failed",
            "undelivered": "failed",
            "sent": "sent",
        }.get(status)
        if mapped is None:
            return True  # queued/accepted/sending: nothing new
        found = await self.deliveries.by_provider_id(provider_id)

        def change(doc: dict[str, Any]) -> None:
            if doc["status"] != "acked":
                doc["status"] = mapped

        for key, doc in found:
            await self.deliveries.update(key.split("|", 1)[0], doc["route"], doc["to"], change)
        return bool(found)


def _cancelled(purpose: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        mark(purpose, "skipped")(doc)
        if doc["status"] == "queued":
            doc["status"] = "cancelled"

    return change
