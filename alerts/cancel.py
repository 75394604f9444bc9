"""The cancel window and the duress PIN (docs/protocol.md, "Cancel window, duress PIN").

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
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from realtime_safety.protocol import ProtocolError

from .delivery import alert_push
from .model import now_ms
from .plan import due
from .views import owner_view

if TYPE_CHECKING:
    from .service import AlertService

log = logging.getLogger("realtime.alerts")

DURESS_NOTE = "DURESS: stopped under threat, treat as active"


def with_duress(note: str | None) -> str:
    """Until every route carries the `duress` flag itself, the note says it (SMS, pushes)."""
    return DURESS_NOTE if not note else f"{DURESS_NOTE}. {note}"


def under_duress(doc: dict[str, Any], escalate_s: float, *, shown: str | None) -> None:
    """The duress PIN: the alarm goes out now (or, if out already, is sent again flagged);
    the owner is shown `shown` (a state; None: no alert at all), or the truth when it is
    "unchanged"."""
    if doc.get("duress") or doc["state"] not in ("countdown", "active"):
        return
    now = now_ms()
    doc["duress"] = True
    doc["note"] = with_duress(doc.get("note"))
    if doc["state"] == "countdown":
        doc.update(state="active", notify_at=now, next_escalation=now + int(escalate_s * 1000))
    else:  # out already: everyone it reached hears it again, with the flag
        reached = dict.fromkeys((r, t) for r, t, p in doc.get("jobs", []) if p != "resolve")
        doc["jobs"] = [*doc.get("jobs", []), *([r, t, "duress"] for r, t in reached)]
    if shown != "unchanged":
        doc["shown"] = {"state": shown, "at": now}


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
