"""The alert's durable plan, as pure functions of its record (no I/O): the trigger's fields, its
id, who gets what on which route for which purpose, when a node must next look at it, the next
escalation step, and the key of a trail point. `alerts.service` stores what these compute."""

from __future__ import annotations

import hashlib
from typing import Any

from realtime_safety.protocol import ProtocolError

from .model import KINDS, MAX_NOTE, now_ms, parse_location

TRIGGER_WINDOW_MS = 600_000  # the trigger limit counts alerts of the last 10 minutes


def parse_trigger(frame: dict[str, Any], max_delay_s: float) -> tuple[dict[str, Any], str, float]:
    """An `alert.trigger` frame: the alert's fields (kind, note, location), the client's
    idempotency key and the countdown asked for (`delay_s`, 0: none)."""
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
    delay = frame.get("delay_s", 0)
    if (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not 0 <= delay <= max_delay_s
    ):
        raise ProtocolError("bad_request", f"'delay_s' must be a number of 0-{max_delay_s:g}")
    return {"kind": kind, "note": note, "location": location}, cid, float(delay)


def alert_id_for(owner: str, client_alert_id: str) -> str:
    """The alert id is a function of who triggered it and the client's idempotency key, so
    that every retry, on any node, names the same alert."""
    return hashlib.sha256(f"{owner}\x00{client_alert_id}".encode()).hexdigest()[:32]


def checkin_alert_id(owner: str, checkin_id: str) -> str:
    """The alert a missed check-in raises: a function of the check-in, so every node that
    fires it names the same alert (and no `client_alert_id` can name it: user ids have no
    0x01)."""
    return hashlib.sha256(f"checkin\x01{owner}\x00{checkin_id}".encode()).hexdigest()[:32]


def plan(contacts: list[dict[str, Any]], responders: list[str], purpose: str) -> list[list[str]]:
    """[route, to, purpose] per recipient and route: users by WebSocket and push, phones by
    SMS; each (route, to) once."""
    targets: list[tuple[str, str]] = []
    for c in contacts:
        if "user" in c:
            targets += [("ws", c["user"]), ("push", c["user"])]
        elif "phone" in c:
            targets.append(("sms", c["phone"]))
    for user in responders:
        targets += [("ws", user), ("push", user)]
    return [[route, to, purpose] for route, to in dict.fromkeys(targets)]


def due(doc: dict[str, Any], reconcile_s: float | None) -> int | None:
    """When a node must next look at the alert: when its countdown ends (nothing else is due
    before: the plan is held until then); to re-queue an unfinished plan (after `reconcile_s`,
    when one is pending) or to escalate, whichever is first; None when neither (and for a
    cancelled alert, whose plan never goes out)."""
    if doc["state"] == "countdown":
        return int(doc["notify_at"])
    if doc["state"] == "cancelled":
        return None
    times = []
    if reconcile_s is not None:
        times.append(now_ms() + int(reconcile_s * 1000))
    if doc["state"] == "active" and not doc["acked_by"] and doc.get("next_escalation"):
        times.append(doc["next_escalation"])
    return min(times) if times else None


def escalation(
    doc: dict[str, Any], contacts: list[dict[str, Any]], escalate_s: float
) -> dict[str, Any]:
    """The next step of an unacknowledged alert (the fields it changes): first a resend to the
    same people, then each time the next tier of contacts."""
    step = doc["escalations"] + 1
    tier = doc["tier"] if step == 1 else doc["tier"] + 1
    tier_contacts = [c for c in contacts if c.get("tier", 1) == tier]
    more = any(c.get("tier", 1) > tier for c in contacts)
    nxt = now_ms() + int(escalate_s * 1000) if (more or step == 1) else None
    responders = doc["responders"] if step == 1 else []
    return {
        "escalations": step,
        "tier": tier,
        "next_escalation": nxt,
        "users": sorted(set(doc["users"]) | {c["user"] for c in tier_contacts if "user" in c}),
        "jobs": [*doc.get("jobs", []), *plan(tier_contacts, responders, f"escalate{step}")],
    }


def trail_key(alert_id: str, location: dict[str, Any]) -> str:
    """A trail point's key is a function of the point: a retried update writes it again."""
    digest = hashlib.sha256(repr(sorted(location.items())).encode()).hexdigest()[:8]
    return f"{alert_id}|{location['ts']:015d}|{digest}"
