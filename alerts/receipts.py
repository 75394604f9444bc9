"""What the recipients' side says about a delivery: the app's receipt (`alert.received`) and the
SMS provider's status callbacks (Twilio). Each moves a delivery record's status forward only
(`records.advance`), whatever order they arrive in.

A status callback can arrive before the worker has written the message id it answers to (the
provider calls back as soon as it has the message). So the callback is kept first (collection
`provider_status`, key the provider's message id) and then applied to whatever record holds
that id; the worker, after writing the id, applies whatever was kept. One of the two always
sees the other's write.
"""

from __future__ import annotations

from typing import Any

from realtime_safety.protocol import ProtocolError
from realtime_safety.storage import DocStore

from .metrics import AlertMetrics
from .model import now_ms
from .records import Deliveries, advance
from .views import owner_view, still_alerted

EARLY = "provider_status"
# Twilio's MessageStatus -> ours; the others (queued, accepted, sending, scheduled, ...) say
# nothing new. https://www.twilio.com/docs/messaging/api/message-resource#message-status-values
TWILIO_STATUS = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "failed",
    "canceled": "failed",
}
RECEIPT_ROUTES = ("ws", "push")


class Receipts:
    def __init__(self, docs: DocStore, metrics: AlertMetrics) -> None:
        self._docs = docs
        self._deliveries = Deliveries(docs)
        self._metrics = metrics

    async def received(
        self, user: str, frame: dict[str, Any], *, responder: bool = True
    ) -> dict[str, Any]:
        """`alert.received {alert_id, route?}`: the recipient's app has the alert, by `route`
        (`ws`: the push on `user:<id>`, the default; `push`: the FCM/APNs notification); from
        the people alerted while `still_alerted` (`responder`: the caller's role now)."""
        alert_id, route = frame.get("alert_id"), frame.get("route", "ws")
        if not isinstance(alert_id, str) or not 1 <= len(alert_id) <= 64:
            raise ProtocolError("bad_request", "'alert_id' must be a string")
        if route not in RECEIPT_ROUTES:
            raise ProtocolError("bad_request", "'route' must be ws or push")
        alert = await self._docs.get("alerts", alert_id)
        if alert is None or (alert["owner"] == user and owner_view(alert) is None):
            raise ProtocolError("not_found", "no such alert")  # (as the owner may see it)
        # every one of them is alerted by ws and push
        if not await still_alerted(self._docs, alert, user, responder=responder):
            raise ProtocolError("forbidden", "you were not alerted")
        now = now_ms()

        def change(doc: dict[str, Any]) -> None:
            doc.setdefault("received_at", now)
            advance(doc, "delivered")

        doc = await self._deliveries.update(alert_id, route, user, change)
        if doc["received_at"] == now:  # the first receipt
            self._metrics.deliveries.labels(route, "delivered").inc()
            self._metrics.trigger_to_received_seconds.labels(route).observe(
                max(0.0, (now - alert["created"]) / 1000)
            )
        return {"alert_id": alert_id, "route": route}

    async def provider_status(
        self, provider_id: str, status: str, error_code: str | None = None
    ) -> bool:
        """A provider's status callback: kept, then folded into the record that holds the
        message id (if the worker wrote it yet). True if a record took it."""
        mapped = TWILIO_STATUS.get(status)
        if mapped is None:
            return True
        kept = await self._keep(provider_id, mapped, _error(mapped, error_code))
        return await self._apply(provider_id, kept)

    async def settle(self, provider_id: str) -> None:
        """After the worker wrote `provider_id`: apply a callback that came before."""
        kept = await self._docs.get(EARLY, provider_id)
        if kept is not None:
            await self._apply(provider_id, kept)

    async def purge(self, older_than_ms: int) -> int:
        return await self._docs.delete_below(EARLY, now_ms() - older_than_ms)

    async def _keep(self, provider_id: str, status: str, error: str | None) -> dict[str, Any]:
        """The most certain status heard for a message (callbacks come in any order)."""
        for _ in range(50):
            kept = await self._docs.get(EARLY, provider_id)
            fresh = {"status": (kept or {}).get("status", "queued"), "error": None}
            if kept is not None:
                fresh["error"] = kept.get("error")
            if not advance(fresh, status):
                return fresh
            fresh["error"] = error
            if kept is None:
                if await self._docs.insert(EARLY, provider_id, fresh, ix=now_ms()) is None:
                    return fresh
            elif await self._docs.put(EARLY, provider_id, fresh, ix=now_ms(), version=kept["_v"]):
                return fresh
        raise ProtocolError("unavailable", "status callback too busy, retry")

    async def _apply(self, provider_id: str, kept: dict[str, Any]) -> bool:
        found = await self._deliveries.by_provider_id(provider_id)
        for key, record in found:
            changed = False

            def change(doc: dict[str, Any]) -> None:
                nonlocal changed
                changed = doc.get("provider_id") == provider_id and advance(doc, kept["status"])
                if changed:
                    doc["error"] = kept["error"]

            route, to = record["route"], record["to"]
            await self._deliveries.update(key.split("|", 1)[0], route, to, change)
            if changed:
                self._metrics.deliveries.labels(route, kept["status"]).inc()
        return bool(found)


def _error(status: str, code: str | None) -> str | None:
    if status not in ("undelivered", "failed"):
        return None
    return f"sms: {status}" + (f" (Twilio error {code})" if code else "")
