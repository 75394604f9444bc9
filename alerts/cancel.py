"""Stopping an alert: the cancel window, the duress PIN and resolve (docs/protocol.md,
"Cancel window, duress PIN").

`alert.trigger {..., delay_s}` by an owner who has set a PIN stores the alert in state
`countdown`, with its whole plan and `notify_at`; the plan is held (not queued) until then.
The alert's `due` index is `notify_at`, so at that time the node that stored it (a local timer)
or any node's reconciler activates it, by compare-and-set, once, and the plan goes out as for
any alert: a node killed during the window delays the notification by at most the
reconciler's pause. An owner without a PIN gets no window (the alert goes out at once, the
reply says `warnings: ["no_pin"]`): a countdown that anyone holding the phone could stop would
be a way to silence an SOS.

`alert.cancel {alert_id, pin}` within the window:
- the PIN: the alert is `cancelled`; nothing was sent and nothing will be;
- the duress PIN: the same answer and the same push to the owner (`alert.cancelled` on
  `user:<owner>`), but the alert goes out at once, flagged `duress` (alerts.views: the owner
  goes on seeing a cancelled alert; live pushes then go to the recipients' own `user:`
  channels, never on `alert:<id>`, where the owner may be subscribed);
- after the window either PIN is answered `conflict` (the alert went out: resolve it); the
  duress PIN then also tells everyone the alert reached again, now flagged.

`alert.resolve` by the owner needs the PIN too once one is set (else whoever holds the phone
could stop an alert that is out): with the duress PIN the owner is answered and shown a
resolved alert while it stays active, and everyone it reached is told again, flagged. (No
`alert.resolved` push on `alert:<id>` then: the people alerted may be subscribed there too.)
Moderators resolve without a PIN.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from realtime_safety.protocol import ProtocolError

from .delivery import alert_push
from .model import OUTCOMES, now_ms
from .plan import due
from .views import owner_view

if TYPE_CHECKING:
    from .service import AlertService

log = logging.getLogger("realtime.alerts")

DURESS_NOTE = "DURESS: stopped under threat, treat as active"


def with_duress(note: str | None) -> str:
    """The note says it too: an SMS has no other field, and an app that predates the `duress`
    flag of the alert push (and of the push notification's data) shows the note."""
    return DURESS_NOTE if not note else f"{DURESS_NOTE}. {note}"


def under_duress(
    doc: dict[str, Any], escalate_s: float, *, shown: str | None, outcome: str | None = None
) -> None:
    """The duress PIN: the alarm goes out now (or, if out already, is sent again flagged);
    the owner is shown `shown` (a state, with `outcome`; None: no alert at all), or the truth
    when it is "unchanged"."""
    if doc["state"] not in ("countdown", "active"):
        return
    now = now_ms()
    if not doc.get("duress"):
        doc["duress"] = True
        doc["note"] = with_duress(doc.get("note"))
        if doc["state"] == "countdown":
            doc.update(state="active", notify_at=now, next_escalation=now + int(escalate_s * 1000))
        else:  # out already: everyone it reached hears it again, with the flag
            reached = dict.fromkeys((r, t) for r, t, p in doc.get("jobs", []) if p != "resolve")
            doc["jobs"] = [*doc.get("jobs", []), *([r, t, "duress"] for r, t in reached)]
    if shown != "unchanged" and not doc.get("shown"):
        doc["shown"] = {"state": shown, "outcome": outcome, "at": now}


def moderators_push(alert: dict[str, Any]) -> dict[str, Any]:
    return {**alert_push(alert), "duress": bool(alert.get("duress"))}


async def cancel(svc: AlertService, owner: str, frame: dict[str, Any]) -> dict[str, Any]:
    alert = await svc.alert(frame.get("alert_id"))
    if alert["owner"] != owner:
        raise ProtocolError("forbidden", "only the alert's owner cancels it")
    if owner_view(alert) is None:
        raise ProtocolError("not_found", "no such alert")
    match = await svc.pins.check(owner, frame.get("pin"))
    settings = svc.settings

    def change(doc: dict[str, Any]) -> None:
        if match == "duress":
            shown = "cancelled" if doc["state"] == "countdown" else "unchanged"
            under_duress(doc, settings.escalate_s, shown=shown)
        elif doc["state"] == "countdown":
            doc.update(state="cancelled", cancelled=now_ms(), next_escalation=None)
        doc["due"] = due(doc, settings.reconcile_s)

    was_duress = bool(alert.get("duress"))
    alert = await svc.update(alert["id"], change)
    view = owner_view(alert)
    assert view is not None
    if match == "duress" and not was_duress and alert.get("duress"):
        svc.checkpoint("duress:stored")
        svc.background(went_out(svc, alert), "duress")
    if view["state"] != "cancelled":
        what = "resolved" if view["state"] == "resolved" else "out: resolve it"
        raise ProtocolError("conflict", f"too late to cancel, the alert is {what}")
    await svc.announce(f"user:{owner}", {"push": "alert.cancelled", "alert_id": alert["id"]})
    return {"alert_id": alert["id"], "state": "cancelled"}


async def went_out(svc: AlertService, alert: dict[str, Any]) -> None:
    """After the commit that made an alert go out (its countdown ended, or the duress PIN):
    queue its plan and tell the moderators. A failure only delays it: the alert is due."""
    await svc.finish(alert, "alert")
    await svc.announce("@moderators", moderators_push(alert))


async def resolve(
    svc: AlertService, user: str, moderator: bool, frame: dict[str, Any]
) -> dict[str, Any]:
    alert = await svc.alert(frame.get("alert_id"))
    if alert["owner"] != user and not moderator:
        raise ProtocolError("forbidden", "only the owner or a moderator resolves an alert")
    outcome = frame.get("outcome")
    if outcome not in OUTCOMES:
        raise ProtocolError(
            "bad_request", f"'outcome' must be one of {', '.join(sorted(OUTCOMES))}"
        )
    view = alert if moderator else owner_view(alert)
    if view is None:
        raise ProtocolError("not_found", "no such alert")
    match = "pin"
    if not moderator and await svc.pins.has_pin(user):
        if frame.get("pin") is None:
            raise ProtocolError("forbidden", "'pin' is needed (a PIN is set)")
        match = await svc.pins.check(user, frame.get("pin"))
    if view["state"] == "cancelled":
        return {"alert_id": alert["id"], "state": "cancelled"}
    if view["state"] == "countdown" and not moderator:
        raise ProtocolError("conflict", "the alert has not gone out: cancel it (alert.cancel)")
    reply = {"alert_id": alert["id"], "state": "resolved"}
    if view["state"] == "resolved" and alert["state"] != "resolved":
        return reply  # what the owner was shown after the duress PIN
    if match == "duress":
        settings = svc.settings

        def duress(doc: dict[str, Any]) -> None:
            if doc["state"] == "active":
                under_duress(doc, settings.escalate_s, shown="resolved", outcome=outcome)
                doc["due"] = due(doc, settings.reconcile_s)

        alert = await svc.update(alert["id"], duress)
        if alert.get("duress"):
            svc.background(went_out(svc, alert), "duress")
            return reply
    if alert["state"] == "resolved":  # a retry: finish queueing the notices
        await svc.finish(alert, "resolve")
        return reply

    def change(doc: dict[str, Any]) -> None:
        if doc["state"] == "resolved":
            return
        # Everyone alerted hears it, on every route they were alerted through (the worker
        # skips those the alert never reached).
        routes = dict.fromkeys((r, t) for r, t, p in doc.get("jobs", []) if p != "resolve")
        doc.update(
            state="resolved",
            outcome=outcome,
            resolved=now_ms(),
            resolved_by=user,
            next_escalation=None,
            jobs=[*doc.get("jobs", []), *([r, t, "resolve"] for r, t in routes)],
        )
        doc["due"] = due(doc, svc.settings.reconcile_s)

    alert = await svc.update(alert["id"], change)
    svc.checkpoint("resolve:stored")
    await svc.finish(alert, "resolve")
    push = {"push": "alert.resolved", "alert_id": alert["id"], "outcome": alert["outcome"]}
    try:
        await svc.live(alert, push, owner=False)
    except Exception as exc:
        log.warning("alerts: live resolve push not sent (%s)", type(exc).__name__)
    await svc.announce(
        "@moderators", {**alert_push(alert, with_location=False), "outcome": alert["outcome"]}
    )
    return reply
