"""Safety alerts (PROTOCOL.md section 7): trigger, live location, ack, resolve, status,
responders' shared locations, the delivery workers and escalation.

Records (in the store's small-document collections, so in SQLite or MongoDB):
- `alerts` key alert id, ix = next escalation time while unacknowledged and active;
- `alert_ids` key "owner|client_alert_id" -> alert id (trigger idempotency);
- `alert_trail` key "alert id|ts|n", ix = ts (purged after RT_ALERT_TRAIL_DAYS);
- `deliveries` key "alert id|route|to", ix = the provider's message id (status webhooks);
- `contacts` key owner -> tiers of emergency contacts; `push_tokens` key "user|token".

Every notification is a job in the durable queue (`alerts.queue`): one per (alert, recipient,
route, purpose), retried with exponential backoff and jitter, dead-lettered as `failed`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from realtime.protocol import ProtocolError
from storage import DocStore, StoreUnavailable

from .model import KINDS, MAX_NOTE, OUTCOMES, distance_m, now_ms, parse_location
from .providers import ProviderError, PushProvider, SmsProvider
from .queue import Job, JobQueue

log = logging.getLogger("realtime.alerts")

# (user channel or alert channel, push dict) -> published to the node's hub
Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
IsOnline = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True)
class AlertSettings:
    escalate_s: float = 120.0
    responder_radius_m: float = 2000.0
    responder_ttl_s: float = 900.0
    trail_days: float = 30.0
    trigger_limit: int = 5  # per user per 10 minutes
    max_attempts: int = 6
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    push_ttl_s: int = 3600
    public_url: str | None = None  # for Twilio status callbacks
    workers: int = 4
    lease_s: float = 30.0


class Responders:
    """Where responders last said they are, for 'nearby' matching; entries expire."""

    def __init__(self, redis_url: str | None, ttl_s: float) -> None:
        self._redis: Any = aioredis.from_url(redis_url) if redis_url else None
        self._local: dict[str, tuple[dict[str, Any], float]] = {}
        self._ttl = ttl_s

    async def share(self, user: str, location: dict[str, Any]) -> None:
        expires = time.time() + self._ttl
        if self._redis is None:
            self._local[user] = (location, expires)
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.geoadd("rt:responders:geo", (location["lon"], location["lat"], user))
            pipe.zadd("rt:responders:expiry", {user: expires})
            await pipe.execute()

    async def near(self, location: dict[str, Any], radius_m: float) -> list[str]:
        now = time.time()
        if self._redis is None:
            self._local = {u: v for u, v in self._local.items() if v[1] > now}
            return sorted(
                u for u, (loc, _) in self._local.items() if distance_m(loc, location) <= radius_m
            )
        expired = await self._redis.zrangebyscore("rt:responders:expiry", "-inf", now)
        if expired:
            await self._redis.zrem("rt:responders:geo", *expired)
            await self._redis.zrem("rt:responders:expiry", *expired)
        found = await self._redis.geosearch(
            "rt:responders:geo",
            longitude=location["lon"],
            latitude=location["lat"],
            radius=radius_m,
            unit="m",
        )
        return sorted(u.decode() for u in found)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def _push_shape(alert: dict[str, Any], *, with_location: bool = True) -> dict[str, Any]:
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


class AlertService:
    def __init__(
        self,
        docs: DocStore,
        queue: JobQueue,
        push: PushProvider,
        sms: SmsProvider,
        responders: Responders,
        publish: Publish,
        is_online: IsOnline,
        settings: AlertSettings,
        node_id: str,
    ) -> None:
        self.docs = docs
        self.queue = queue
        self.push = push
        self.sms = sms
        self.responders = responders
        self._publish = publish
        self._is_online = is_online
        self.settings = settings
        self._node = node_id
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._triggers: dict[str, list[float]] = {}

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        for i in range(self.settings.workers):
            self._tasks.append(
                asyncio.create_task(self._worker(f"{self._node}-{i}"), name=f"alert-worker-{i}")
            )
        self._tasks.append(asyncio.create_task(self._escalator(), name="alert-escalation"))
        self._tasks.append(asyncio.create_task(self._janitor(), name="alert-trail-retention"))
        for provider, what in ((self.push, "push notifications"), (self.sms, "SMS")):
            if provider.name.startswith("outbox"):
                log.warning("alerts: no credentials: %s are written to the %s", what, provider.name)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for closer in (self.queue.close, self.push.close, self.sms.close, self.responders.close):
            try:
                await closer()
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

    async def _update(
        self, alert_id: str, change: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Compare-and-set loop: apply `change` to the freshest copy."""
        for _ in range(50):
            doc = await self.alert(alert_id)
            change(doc)
            if await self.docs.put(
                "alerts", alert_id, doc, ix=doc.get("next_escalation"), version=doc["_v"]
            ):
                doc["_v"] += 1
                return doc
        raise ProtocolError("unavailable", "the alert is too busy, retry")

    async def contacts(self, owner: str) -> list[dict[str, Any]]:
        doc = await self.docs.get("contacts", owner)
        return list(doc["contacts"]) if doc else []

    async def set_contacts(self, owner: str, contacts: list[dict[str, Any]]) -> None:
        await self.docs.put("contacts", owner, {"contacts": contacts})

    async def _delivery(self, alert_id: str, route: str, to: str, **fields: Any) -> None:
        key = f"{alert_id}|{route}|{to}"
        for _ in range(20):
            doc = await self.docs.get("deliveries", key)
            if doc is None:
                new = {
                    "to": to,
                    "route": route,
                    "status": "queued",
                    "attempts": 0,
                    "provider_id": None,
                    **fields,
                }
                if (
                    await self.docs.insert("deliveries", key, new, ix=new.get("provider_id"))
                    is None
                ):
                    return
                continue
            if doc["status"] == "acked" and fields.get("status") not in (None, "acked"):
                fields = {k: v for k, v in fields.items() if k != "status"}
            merged = {**doc, **fields}
            if await self.docs.put(
                "deliveries", key, merged, ix=merged.get("provider_id"), version=doc["_v"]
            ):
                return

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
        alert_id = uuid.uuid4().hex
        existing = await self.docs.insert("alert_ids", f"{owner}|{cid}", {"id": alert_id})
        if existing is not None:  # a retry: the original alert
            return {"alert_id": existing["id"], "channel": f"alert:{existing['id']}"}
        self._rate_limit(owner)
        contacts = await self.contacts(owner)
        tier1 = [c for c in contacts if c.get("tier", 1) == 1]
        responders = [
            u
            for u in await self.responders.near(location, self.settings.responder_radius_m)
            if u != owner
        ]
        users = sorted({c["user"] for c in tier1 if "user" in c} | set(responders))
        now = now_ms()
        alert = {
            "id": alert_id,
            "owner": owner,
            "kind": kind,
            "note": note,
            "location": location,
            "state": "active",
            "outcome": None,
            "created": now,
            "users": users,
            "responders": responders,
            "acked_by": [],
            "tier": 1,
            "escalations": 0,
            "next_escalation": now + int(self.settings.escalate_s * 1000),
        }
        await self.docs.insert("alerts", alert_id, alert, ix=alert["next_escalation"])
        await self.docs.put("active_alerts", alert_id, {"id": alert_id}, ix=now)
        await self.docs.put("alert_trail", f"{alert_id}|{now:015d}|0", location, ix=now)
        await self._notify(alert, tier1, responders, purpose="alert")
        await self._publish("@moderators", _push_shape(alert))
        return {"alert_id": alert_id, "channel": f"alert:{alert_id}"}

    def _rate_limit(self, owner: str) -> None:
        now = time.monotonic()
        recent = [t for t in self._triggers.get(owner, []) if now - t < 600]
        if len(recent) >= self.settings.trigger_limit:
            self._triggers[owner] = recent
            raise ProtocolError(
                "rate_limited",
                "too many alerts; call emergency services",
                retry_after_ms=int((600 - (now - recent[0])) * 1000),
            )
        self._triggers[owner] = [*recent, now]

    async def _notify(
        self,
        alert: dict[str, Any],
        contacts: list[dict[str, Any]],
        responders: list[str],
        *,
        purpose: str,
    ) -> None:
        """Queue one job per (recipient, route): users by WebSocket and push, phones by SMS."""
        targets: list[tuple[str, str]] = []
        for c in contacts:
            if "user" in c:
                targets += [("ws", c["user"]), ("push", c["user"])]
            elif "phone" in c:
                targets.append(("sms", c["phone"]))
        for user in responders:
            targets += [("ws", user), ("push", user)]
        seen = set()
        for route, to in targets:
            if (route, to) in seen:
                continue
            seen.add((route, to))
            await self._delivery(alert["id"], route, to)  # (no change if it exists)
            key = f"{alert['id']}|{route}|{to}|{purpose}"
            await self.queue.put(
                key, {"alert_id": alert["id"], "route": route, "to": to, "purpose": purpose}
            )
        self._wake.set()

    async def location(self, user: str, frame: dict[str, Any]) -> dict[str, Any]:
        alert = await self.alert(frame.get("alert_id"))
        if alert["owner"] != user:
            raise ProtocolError("forbidden", "only the alert's owner sends its location")
        if alert["state"] != "active":
            raise ProtocolError("conflict", "the alert is resolved")
        location = parse_location(frame.get("location"))
        now = now_ms()
        await self.docs.put(
            "alert_trail", f"{alert['id']}|{now:015d}|{uuid.uuid4().hex[:6]}", location, ix=now
        )

        def change(doc: dict[str, Any]) -> None:
            doc["location"] = location

        await self._update(alert["id"], change)
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

        alert = await self._update(alert["id"], change)
        for route in ("ws", "push"):
            key = f"{alert['id']}|{route}|{user}"
            if await self.docs.get("deliveries", key) is not None:
                await self._delivery(alert["id"], route, user, status="acked")
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
        if alert["state"] == "resolved":
            return {"alert_id": alert["id"], "state": "resolved"}

        def change(doc: dict[str, Any]) -> None:
            doc.update(
                state="resolved",
                outcome=outcome,
                resolved=now_ms(),
                resolved_by=user,
                next_escalation=None,
            )

        alert = await self._update(alert["id"], change)
        await self.docs.delete("active_alerts", alert["id"])
        # Everyone alerted hears it, on every route they were alerted through.
        for d in await self.docs.prefix("deliveries", f"{alert['id']}|", 10_000):
            key = f"{alert['id']}|{d['route']}|{d['to']}|resolve"
            await self.queue.put(
                key,
                {"alert_id": alert["id"], "route": d["route"], "to": d["to"], "purpose": "resolve"},
            )
        self._wake.set()
        push = {"push": "alert.resolved", "alert_id": alert["id"], "outcome": outcome}
        await self._publish(f"alert:{alert['id']}", push)
        await self._publish(
            "@moderators", {**_push_shape(alert, with_location=False), "outcome": outcome}
        )
        return {"alert_id": alert["id"], "state": "resolved"}

    async def status(self, user: str, moderator: bool, frame: dict[str, Any]) -> dict[str, Any]:
        alert = await self.alert(frame.get("alert_id"))
        if alert["owner"] != user and not moderator:
            raise ProtocolError("forbidden", "only the owner or a moderator sees the status")
        deliveries = await self.docs.prefix("deliveries", f"{alert['id']}|", 10_000)
        return {
            "alert_id": alert["id"],
            "state": alert["state"],
            "outcome": alert["outcome"],
            "recipients": [
                {
                    "to": d["to"],
                    "route": d["route"],
                    "status": d["status"],
                    "attempts": d["attempts"],
                }
                for d in deliveries
            ],
        }

    async def active(self) -> list[dict[str, Any]]:
        """Active alerts with their latest location and delivery status (moderators)."""
        out = []
        for _, entry in await self.docs.below("active_alerts", 2**62, 500):
            doc = await self.docs.get("alerts", entry["id"])
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
                }
            )
        return out

    async def share_location(self, user: str, frame: dict[str, Any]) -> dict[str, Any]:
        location = parse_location(frame.get("location"))
        await self.responders.share(user, location)
        return {"expires_in_s": int(self.settings.responder_ttl_s)}

    # --- delivery ---------------------------------------------------------------------

    async def _worker(self, consumer: str) -> None:
        while True:
            try:
                jobs = await self.queue.take(consumer, 10, self.settings.lease_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alerts: queue unavailable (%s)", type(exc).__name__)
                await asyncio.sleep(1)
                continue
            if not jobs:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                except TimeoutError:
                    pass
                continue
            await asyncio.gather(*(self._run(job) for job in jobs))

    async def _run(self, job: Job) -> None:
        data = job.data
        try:
            await self._deliver(job)
        except ProviderError as exc:
            await self._failed(job, str(exc), permanent=exc.permanent)
            return
        except (StoreUnavailable, OSError, TimeoutError) as exc:
            await self._failed(job, type(exc).__name__, permanent=False)
            return
        except Exception:
            log.exception("alerts: delivery job failed unexpectedly")
            await self._failed(job, "internal", permanent=False)
            return
        await self.queue.done(job)
        log.debug("alerts: %s %s delivered", data["route"], data["purpose"])

    async def _failed(self, job: Job, error: str, *, permanent: bool) -> None:
        data = job.data
        attempts = job.attempts + 1
        final = permanent or attempts >= self.settings.max_attempts
        if data["purpose"] != "resolve":
            await self._delivery(
                data["alert_id"],
                data["route"],
                data["to"],
                attempts=attempts,
                error=error,
                **({"status": "failed"} if final else {}),
            )
        if final:
            log.warning(
                "alerts: %s delivery dead-lettered after %d attempts: %s",
                data["route"],
                attempts,
                error,
            )
            await self.queue.done(job)
            return
        delay = min(self.settings.retry_max_s, self.settings.retry_base_s * 2**job.attempts)
        await self.queue.retry(job, now_ms() + int(delay * (0.5 + random.random()) * 1000))

    async def _deliver(self, job: Job) -> None:
        data = job.data
        alert = await self.docs.get("alerts", data["alert_id"])
        if alert is None:
            return
        route, to, purpose = data["route"], data["to"], data["purpose"]
        if purpose != "resolve" and alert["state"] == "resolved":
            return  # resolved before this went out: nobody needs it now
        key = f"{alert['id']}|{route}|{to}"
        delivery = await self.docs.get("deliveries", key)
        sent = list(delivery.get("sent", [])) if delivery else []
        if purpose in sent:
            return  # sent before a crash stopped the job from being marked done
        if route == "ws":
            push = (
                _push_shape(alert)
                if purpose != "resolve"
                else {
                    "push": "alert.resolved",
                    "alert_id": alert["id"],
                    "outcome": alert["outcome"],
                }
            )
            await self._publish(f"user:{to}", push)
            status = "delivered" if await self._is_online(to) else "sent"
        elif route == "push":
            status = await self._send_push(alert, to, purpose)
        else:
            status = await self._send_sms(alert, to, purpose, key)
        fields: dict[str, Any] = {"sent": [*sent, purpose]}
        if purpose != "resolve":
            fields.update(status=status, attempts=job.attempts + 1, error=None)
        await self._delivery(alert["id"], route, to, **fields)

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
        raise ProviderError(f"push failed: {results[0].error}")

    async def _send_sms(self, alert: dict[str, Any], phone: str, purpose: str, key: str) -> str:
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
        sid = await self.sms.send(phone, body, callback)
        if purpose != "resolve":
            await self._delivery(alert["id"], "sms", phone, provider_id=sid)
        return "sent"

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
        found = await self.docs.find_ix("deliveries", provider_id)
        for key, doc in found:
            alert_id = key.split("|", 1)[0]
            await self._delivery(alert_id, doc["route"], doc["to"], status=mapped)
        return bool(found)

    # --- escalation and retention ------------------------------------------------------

    async def _escalator(self) -> None:
        while True:
            try:
                await self._escalate_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alerts: escalation pass failed: %s", exc)
            await asyncio.sleep(min(1.0, self.settings.escalate_s / 4))

    async def _escalate_due(self) -> None:
        """Unacknowledged past the deadline: first resend to the same people, then each time
        the next tier of contacts. Compare-and-set makes exactly one node do each step."""
        for alert_id, doc in await self.docs.below("alerts", now_ms(), 20):
            if doc["state"] != "active" or doc["acked_by"]:
                continue
            step = doc["escalations"] + 1
            contacts = await self.contacts(doc["owner"])
            tier = doc["tier"] if step == 1 else doc["tier"] + 1
            tier_contacts = [c for c in contacts if c.get("tier", 1) == tier]
            more = any(c.get("tier", 1) > tier for c in contacts)
            nxt = now_ms() + int(self.settings.escalate_s * 1000) if (more or step == 1) else None
            new_users = sorted(
                set(doc["users"]) | {c["user"] for c in tier_contacts if "user" in c}
            )
            updated = {
                **doc,
                "escalations": step,
                "tier": tier,
                "next_escalation": nxt,
                "users": new_users,
            }
            if not await self.docs.put("alerts", alert_id, updated, ix=nxt, version=doc["_v"]):
                continue  # another node took this step
            responders = doc["responders"] if step == 1 else []
            await self._notify(updated, tier_contacts, responders, purpose=f"escalate{step}")
            log.info("alerts: escalated an alert (step %d, tier %d)", step, tier)

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(60)
            cutoff = now_ms() - int(self.settings.trail_days * 86_400_000)
            try:
                await self.docs.delete_below("alert_trail", cutoff)
            except Exception as exc:
                log.warning("alerts: trail retention failed: %s", exc)
