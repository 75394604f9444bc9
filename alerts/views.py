"""What each party may see of an alert: the owner (the phone, which may be in someone else's
hands), the people alerted, moderators (and the app's backend, through the HTTP API).

An alert cancelled with the duress PIN is really `active`, and records what the phone was
shown in `shown` ({"state": "cancelled"}; {"state": None} for an alert the phone never heard
of, a missed check-in whose timer was stopped with the duress PIN). Every owner-facing answer
goes through `owner_view`, so such an alert looks to the owner exactly like a cancelled one
(or like no alert at all); moderators and the backend see the truth, `duress` included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from realtime_safety.protocol import ProtocolError
from realtime_safety.storage import DocStore

from .records import new_delivery, recipient_view, warnings

if TYPE_CHECKING:
    from .service import AlertService

# The recipients' status while the plan is held, and after a cancel.
HELD, CANCELLED = "held", "cancelled"
MAX_TRAIL = 1000


def owner_view(alert: dict[str, Any]) -> dict[str, Any] | None:
    """The alert as its owner may see it; None: as if it did not exist."""
    shown = alert.get("shown")
    if shown is None:
        return alert
    if shown["state"] is None:
        return None
    return {
        **alert,
        "state": shown["state"],
        "outcome": shown.get("outcome"),
        "jobs": [job for job in alert.get("jobs", []) if job[2] == "alert"],
        "acked_by": [],
        "duress": False,
    }


def trigger_reply(alert: dict[str, Any]) -> dict[str, Any]:
    """`alert.trigger`'s answer (and a retry's): the state as the owner may see it."""
    view = owner_view(alert) or alert
    reply = {"alert_id": alert["id"], "channel": f"alert:{alert['id']}", "state": view["state"]}
    if view["state"] == "countdown":
        reply["notify_at"] = alert["notify_at"]
    if warnings(view):
        reply["warnings"] = warnings(view)  # e.g. no_recipients: nobody is being notified
    return reply


def seen_by(alert: dict[str, Any], user: str, moderator: bool) -> dict[str, Any]:
    """The alert as `user` may see it through alert.status: `forbidden` for anyone but the
    owner and moderators, `not_found` for an owner who must not know of it."""
    if moderator:
        return alert
    if alert["owner"] != user:
        raise ProtocolError("forbidden", "only the owner or a moderator sees the status")
    view = owner_view(alert)
    if view is None:
        raise ProtocolError("not_found", "no such alert")
    return view


def notified(alert: dict[str, Any]) -> bool:
    """Whether the plan has gone out (recipients know of the alert)."""
    return alert["state"] in ("active", "resolved")


async def contacts_of(docs: DocStore, owner: str) -> list[dict[str, Any]]:
    """The owner's emergency contacts as they are now (store documents `contacts`)."""
    doc = await docs.get("contacts", owner)
    return list(doc["contacts"]) if doc else []


async def still_alerted(
    docs: DocStore, alert: dict[str, Any], user: str, *, responder: bool = True
) -> bool:
    """Whether `user`, one of the people `alert` went to, still is: a nearby responder while
    they are one (`responder`: their role now), or the owner's emergency contact now. A contact
    the owner removes mid-alert is one no more (unless also a responder, as one): for them the
    alert is a stranger's. One rule for `alert:<id>`, `alert.trail`, `alert.ack`,
    `alert.received`, the live pushes and the notices still to go out."""
    if user not in alert["users"]:
        return False
    if responder and user in alert.get("responders", ()):
        return True
    return any(c.get("user") == user for c in await contacts_of(docs, alert["owner"]))


async def still_reaches(docs: DocStore, alert: dict[str, Any], route: str, to: str) -> bool:
    """Whether a notice by `route` to `to` (a user, or a phone for SMS) may still go out: not
    to a contact the owner has removed since (a responder's notices go out as planned)."""
    if route != "sms":
        return await still_alerted(docs, alert, to)
    return any(c.get("phone") == to for c in await contacts_of(docs, alert["owner"]))


async def can_see(
    svc: AlertService, user: str, alert_id: str, moderator: bool, responder: bool = True
) -> bool:
    """`alert:<id>` (live location, acks): the owner, the people alerted once it went out (while
    `still_alerted`), and moderators."""
    if moderator:
        return True
    doc = await svc.docs.get("alerts", alert_id)
    if doc is None:
        return False
    if user == doc["owner"]:
        return owner_view(doc) is not None
    return notified(doc) and await still_alerted(svc.docs, doc, user, responder=responder)


async def status(
    svc: AlertService, user: str, moderator: bool, frame: dict[str, Any]
) -> dict[str, Any]:
    alert = await svc.alert(frame.get("alert_id"))
    view = seen_by(alert, user, moderator)
    reply: dict[str, Any] = {
        "alert_id": alert["id"],
        "state": view["state"],
        "outcome": view["outcome"],
    }
    if view["state"] in ("countdown", "cancelled"):  # nothing went out: the plan as it stands
        word = HELD if view["state"] == "countdown" else CANCELLED
        planned = dict.fromkeys((route, to) for route, to, _ in view.get("jobs", []))
        recipients = [
            {"to": to, "route": route, "status": word, "attempts": 0, "error": None}
            for route, to in planned
        ]
    else:
        deliveries = await svc.deliveries.of(alert["id"])
        for route, to, _ in view.get("jobs", []):  # planned, no outcome yet
            deliveries.setdefault((route, to), new_delivery(route, to))
        recipients = [recipient_view(d) for d in deliveries.values()]
    reply["recipients"] = recipients
    reply["warnings"] = warnings(view)
    if view["state"] == "countdown":
        reply["notify_at"] = alert["notify_at"]
    if moderator:
        reply["duress"] = bool(alert.get("duress"))
        if alert.get("checkin_id"):
            reply["checkin_id"] = alert["checkin_id"]
    return reply


async def active(svc: AlertService) -> list[dict[str, Any]]:
    """Active alerts with their latest location and delivery status (moderators)."""
    out = []
    for key, _ in await svc.docs.below("active_alerts", 2**62, 500):
        doc = await svc.docs.get("alerts", key)
        if doc is None or doc["state"] != "active":
            continue
        seen = await status(svc, doc["owner"], True, {"alert_id": doc["id"]})
        out.append(
            {
                "alert_id": doc["id"],
                "owner": doc["owner"],
                "kind": doc["kind"],
                "note": doc.get("note"),
                "location": doc["location"],
                "created": doc["created"],
                "acked_by": doc["acked_by"],
                "duress": bool(doc.get("duress")),
                "recipients": seen["recipients"],
                "warnings": seen["warnings"],
            }
        )
    return out


async def trail(
    svc: AlertService, user: str, moderator: bool, frame: dict[str, Any], *, responder: bool = True
) -> dict[str, Any]:
    """`alert.trail {alert_id, limit?}`: the alert's location trail, oldest first (for a
    missed check-in, the points sent while the timer ran): the owner, the people alerted once
    it went out (while `still_alerted`), moderators."""
    alert = await svc.alert(frame.get("alert_id"))
    limit = frame.get("limit", MAX_TRAIL)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_TRAIL:
        raise ProtocolError("bad_request", f"'limit' must be 1-{MAX_TRAIL}")
    if not moderator:
        if alert["owner"] == user:
            if owner_view(alert) is None:
                raise ProtocolError("not_found", "no such alert")
        elif not notified(alert) or not await still_alerted(
            svc.docs, alert, user, responder=responder
        ):
            raise ProtocolError("forbidden", "only the owner, the people alerted or moderators")
    points = await svc.docs.prefix("alert_trail", f"{alert['id']}|", limit)
    return {"alert_id": alert["id"], "points": [_point(p) for p in points]}


def _point(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "_v"}
