"""Check-in timers, a dead-man switch (docs/protocol.md, "Check-in timers"): `checkin.start`
sets a timer; unless the owner checks in (`checkin.done`) or moves it (`checkin.extend`) in
time, the server itself raises an alert of kind `checkin_missed` for the owner, with the last
known location and the trail sent while it ran (`checkin.location`), through the normal plan
(contacts, responders nearby, escalation). The phone may be off, broken or taken: nothing of
it is needed when the timer ends.

Records (the store's documents, like alerts):
- `checkins` key check-in id, ix = when a node must next look at it: its expiry while it runs,
  `claim_s` after a claim while it fires, None once it is over. The record holds the owner,
  `state` (running, firing, fired, done), the note, the last known location and the newest
  `trail_points` points, `expires`, the id of the alert it raises (a function of owner and
  check-in, alerts.plan.checkin_alert_id), and for the duress PIN `duress` and `shown`;
- `checkin_users` key owner -> {"running": [[id, ms], ...]}: the per-user limit (a slot whose
  check-in is over is dropped by the next start).

Firing, exactly once across nodes: every node looks for due check-ins every `poll_s` (and the
node that set or moved a timer wakes at its expiry); a node claims one by compare-and-set on
the record (state `firing`, due again `claim_s` later), then creates the alert — an insert
keyed by the alert id, so whoever finishes a claim that another node started (killed, or
slow) names the same alert and the first insert stands — and marks it `fired`. Redis plays no
part (the store alone holds timers and alerts; the queues are rebuilt from the plan).

Once a PIN is set (alerts.pins), `checkin.done` and `checkin.extend` need it: with the duress
PIN they answer as usual (done; moved) while the alert is raised at once, flagged `duress`, and
hidden from the owner (alerts.views).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from realtime_safety.protocol import Feature, ProtocolError, Reply, Session

from .cancel import with_duress
from .lane import Lane
from .model import MAX_NOTE, now_ms, parse_location
from .plan import checkin_alert_id, trail_key

if TYPE_CHECKING:
    from .service import AlertService

log = logging.getLogger("realtime.alerts")

RUNNING = ("running", "firing")
STALE_SLOT_MS = 60_000  # a slot whose record never appeared (a start cut short)


@dataclass(frozen=True)
class CheckinSettings:
    min_duration_s: float = 1.0
    max_duration_s: float = 86_400.0
    active_limit: int = 3  # running check-ins per user
    poll_s: float = 0.25  # every node looks for due check-ins this often
    claim_s: float = 0.5  # a claim not finished by then is taken over by any node
    trail_points: int = 100  # the newest points kept while a check-in runs


def _view(doc: dict[str, Any]) -> dict[str, Any]:
    """The check-in as its owner may see it (a duress PIN: what they were shown)."""
    return {**doc, **doc["shown"]} if doc.get("shown") else doc


def _reply(doc: dict[str, Any]) -> Reply:
    view = _view(doc)
    state = "running" if view["state"] in RUNNING else view["state"]
    reply = {"checkin_id": doc["id"], "state": state, "alert_id": doc["alert_id"]}
    if state == "running":
        reply["expires_at"] = view["expires"]
    return reply


class CheckinService:
    def __init__(self, service: AlertService, settings: CheckinSettings) -> None:
        self._svc = service
        self.settings = settings
        self.docs = service.docs

    def tasks(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._ticker(), name="checkin-timers")]

    # --- ops ------------------------------------------------------------------------------

    def _duration(self, frame: dict[str, Any]) -> int:
        low, high = self.settings.min_duration_s, self.settings.max_duration_s
        value = frame.get("duration_s")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ProtocolError("bad_request", f"'duration_s' must be a number of {low:g}-{high:g}")
        return int(value * 1000)

    async def start(self, owner: str, frame: dict[str, Any]) -> Reply:
        duration = self._duration(frame)
        location = parse_location(frame.get("location"))
        note = frame.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            raise ProtocolError("bad_request", f"'note' must be a string of at most {MAX_NOTE}")
        cid = frame.get("client_checkin_id")
        if cid is None:
            checkin_id = secrets.token_hex(16)
        elif isinstance(cid, str) and 1 <= len(cid) <= 64:
            key = f"checkin-id\x01{owner}\x00{cid}".encode()
            checkin_id = hashlib.sha256(key).hexdigest()[:32]
        else:
            raise ProtocolError("bad_request", "'client_checkin_id' must be 1-64 characters")
        existing = await self.docs.get("checkins", checkin_id)
        if existing is not None:  # a retry
            return _reply(existing)
        wait = await self._svc.quota.full(owner)
        if wait is not None:
            raise ProtocolError("rate_limited", "too many alerts lately", retry_after_ms=wait)
        await self._take_slot(owner, checkin_id)
        now = now_ms()
        doc: dict[str, Any] = {
            "id": checkin_id,
            "owner": owner,
            "state": "running",
            "note": note,
            "location": location,
            "trail": [location],
            "created": now,
            "expires": now + duration,
            "alert_id": checkin_alert_id(owner, checkin_id),
        }
        doc["due"] = doc["expires"]
        raced = await self.docs.insert("checkins", checkin_id, doc, ix=doc["due"])
        if raced is not None:
            return _reply(raced)
        self._wake(doc["expires"], checkin_id)
        return _reply(doc)

    async def _own(self, owner: str, frame: dict[str, Any]) -> dict[str, Any]:
        checkin_id = frame.get("checkin_id")
        if not isinstance(checkin_id, str) or not 1 <= len(checkin_id) <= 64:
            raise ProtocolError("bad_request", "'checkin_id' must be a string")
        doc = await self.docs.get("checkins", checkin_id)
        if doc is None:
            raise ProtocolError("not_found", "no such check-in")
        if doc["owner"] != owner:
            raise ProtocolError("forbidden", "only the owner of a check-in may do that")
        return doc

    async def _pin(self, owner: str, frame: dict[str, Any]) -> str:
        """ "pin" (or no PIN set) or "duress"."""
        if not await self._svc.pins.has_pin(owner):
            return "pin"
        if frame.get("pin") is None:
            raise ProtocolError("forbidden", "'pin' is needed (a PIN is set)")
        return await self._svc.pins.check(owner, frame.get("pin"))

    async def extend(self, owner: str, frame: dict[str, Any]) -> Reply:
        """The timer then ends `duration_s` from now (a retry moves it by the time between)."""
        doc = await self._own(owner, frame)
        duration = self._duration(frame)
        match = await self._pin(owner, frame)
        expires = now_ms() + duration

        def change(fresh: dict[str, Any]) -> None:
            if _view(fresh)["state"] != "running":
                return
            if fresh.get("shown"):  # stopped with the duress PIN: it goes on looking moved
                fresh["shown"] = {"state": "running", "expires": expires}
            elif match == "duress":
                self._duress(fresh, {"state": "running", "expires": expires})
            elif fresh["state"] == "running":
                fresh["expires"] = fresh["due"] = expires

        doc = await self._update(doc, change)
        view = _view(doc)
        if view["state"] != "running":
            raise ProtocolError("conflict", f"the check-in is over ({_reply(doc)['state']})")
        self._wake(doc["due"], doc["id"])
        return _reply(doc)

    async def done(self, owner: str, frame: dict[str, Any]) -> Reply:
        doc = await self._own(owner, frame)
        match = await self._pin(owner, frame)

        def change(fresh: dict[str, Any]) -> None:
            if _view(fresh)["state"] != "running":
                return
            if fresh.get("shown"):  # stopped with the duress PIN: it goes on looking done
                fresh["shown"] = {"state": "done"}
            elif match == "duress":
                self._duress(fresh, {"state": "done"})
            else:  # over: what it knew of where the owner went is kept nowhere
                fresh.update(state="done", due=None, location=None, trail=[], ended=now_ms())

        doc = await self._update(doc, change)
        if _view(doc)["state"] != "done":
            raise ProtocolError("conflict", "too late: the check-in expired and its alert is out")
        self._wake(doc["due"], doc["id"])  # the duress PIN: due now
        return _reply(doc)

    def _duress(self, doc: dict[str, Any], shown: dict[str, Any]) -> None:
        """The duress PIN: the alert now (hidden from the owner), what they asked for shown."""
        doc.update(state="firing", duress=True, shown=shown, due=now_ms())

    async def location(self, owner: str, frame: dict[str, Any]) -> Reply:
        doc = await self._own(owner, frame)
        location = parse_location(frame.get("location"))
        if _view(doc)["state"] != "running":
            raise ProtocolError("conflict", "the check-in is over")
        keep = self.settings.trail_points

        def change(fresh: dict[str, Any]) -> None:
            if fresh["state"] not in RUNNING:
                return
            if location["ts"] >= fresh["location"]["ts"]:  # a late retry never rewinds
                fresh["location"] = location
            if location not in fresh["trail"]:
                fresh["trail"] = sorted([*fresh["trail"], location], key=lambda p: p["ts"])[-keep:]

        doc = await self._update(doc, change)
        if doc.get("duress"):  # raised already (the duress PIN): the alert follows
            await self._svc.follow(doc["alert_id"], location)
        return {"checkin_id": doc["id"]}

    # --- records ----------------------------------------------------------------------------

    async def _update(self, doc: dict[str, Any], change: Any, attempts: int = 50) -> dict[str, Any]:
        """Compare-and-set loop on a check-in record, starting from `doc`."""
        for _ in range(attempts):
            fresh = dict(doc)
            change(fresh)
            if fresh == doc:
                return doc
            if await self.docs.put(
                "checkins", doc["id"], fresh, ix=fresh["due"], version=doc["_v"]
            ):
                return fresh  # (its `_v` is the one it replaced: not for another write)
            found = await self.docs.get("checkins", doc["id"])
            if found is None:
                raise ProtocolError("not_found", "no such check-in")
            doc = found
        raise ProtocolError("unavailable", "the check-in is too busy, retry")

    async def _take_slot(self, owner: str, checkin_id: str) -> None:
        limit = self.settings.active_limit
        for _ in range(50):
            slots = await self.docs.get("checkin_users", owner)
            now = now_ms()
            held = []
            for other, since in (slots or {}).get("running", []):
                record = await self.docs.get("checkins", other)
                if (record is None and now - since < STALE_SLOT_MS) or (
                    record is not None and record["state"] in RUNNING
                ):
                    held.append([other, since])
            if len(held) >= limit:
                raise ProtocolError("too_large", f"at most {limit} check-ins may run at once")
            new = {"running": [*held, [checkin_id, now]]}
            if slots is None:
                if await self.docs.insert("checkin_users", owner, new) is None:
                    return
            elif await self.docs.put("checkin_users", owner, new, version=slots["_v"]):
                return
        raise ProtocolError("unavailable", "too many concurrent check-ins, retry")

    # --- firing -------------------------------------------------------------------------

    def _wake(self, when_ms: int | None, checkin_id: str) -> None:
        if when_ms is not None:
            self._svc.reconciler.later(when_ms, lambda: self.visit(checkin_id), "checkin")

    async def _ticker(self) -> None:
        while True:
            try:
                await self.fire_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("checkins: timer pass failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(self.settings.poll_s)

    async def fire_due(self) -> None:
        """One pass over every check-in that is due, side by side (one slow store call must
        not make the timers behind it late)."""
        due = await self.docs.below("checkins", now_ms() + 1, 50)
        done = await asyncio.gather(
            *(self._fire(key, doc) for key, doc in due), return_exceptions=True
        )
        for result in done:
            if isinstance(result, Exception):
                log.warning("checkins: firing failed (%s); retrying", type(result).__name__)

    async def visit(self, checkin_id: str) -> None:
        doc = await self.docs.get("checkins", checkin_id)
        if doc is not None and doc.get("due") is not None and doc["due"] <= now_ms():
            await self._fire(checkin_id, doc)

    async def _fire(self, checkin_id: str, doc: dict[str, Any]) -> None:
        svc = self._svc
        if doc["state"] not in RUNNING or doc["due"] is None or doc["due"] > now_ms():
            return
        claimed = {**doc, "state": "firing", "due": now_ms() + int(self.settings.claim_s * 1000)}
        if not await self.docs.put(
            "checkins", checkin_id, claimed, ix=claimed["due"], version=doc["_v"]
        ):
            return  # another node has it
        claimed["_v"] = doc["_v"] + 1
        svc.checkpoint("checkin:claimed")
        alert = await self._raise(claimed)
        log.info(
            "checkins: a check-in expired %d ms ago: alert raised",
            max(0, alert["created"] - claimed["expires"]),
        )

        settled: list[bool] = []

        def fired(fresh: dict[str, Any]) -> None:
            settled[:] = [fresh["state"] == "firing"]
            if fresh["state"] == "firing":
                fresh.update(state="fired", due=None, fired=alert["created"])

        await self._update(claimed, fired)
        if not settled[0]:
            return  # another node that took the claim over settled it (and told the owner)
        if not doc.get("shown"):
            push = {"push": "checkin.missed", "checkin_id": checkin_id, "alert_id": alert["id"]}
            await svc.announce(f"user:{doc['owner']}", push)

    async def _raise(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The check-in's alert (idempotent: a second attempt finds the first one's)."""
        svc, alert_id = self._svc, doc["alert_id"]
        alert = await self.docs.get("alerts", alert_id)
        if alert is not None:
            await svc.finish(alert, "missed check-in")
        else:
            alert = await svc.create(doc["owner"], alert_id, self._fields(doc), force=True)
        # After the alert (it comes first): keyed by content, written again, never twice.
        for point in doc["trail"]:
            await self.docs.put("alert_trail", trail_key(alert_id, point), point, ix=point["ts"])
        return alert

    def _fields(self, doc: dict[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "kind": "checkin_missed",
            "note": doc.get("note"),
            "location": doc["location"],
            "checkin_id": doc["id"],
            "checkin_expired": doc["expires"],
        }
        if doc.get("duress"):
            fields.update(duress=True, note=with_duress(doc.get("note")))
            fields["shown"] = {"state": None, "at": now_ms()}
        return fields


class CheckinOps(Feature):
    """checkin.start, checkin.extend, checkin.done, checkin.location (the owner's own)."""

    def __init__(self, checkins: CheckinService, lane: Lane) -> None:
        self._checkins, self._lane = checkins, lane
        self.ops = {
            "checkin.start": self.start,
            "checkin.extend": self.extend,
            "checkin.done": self.done,
            "checkin.location": self.location,
        }

    async def start(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await session.bounded(
            self._lane.run(self._checkins.start(session.identity.user, frame))
        )

    async def extend(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await session.bounded(
            self._lane.run(self._checkins.extend(session.identity.user, frame))
        )

    async def done(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await session.bounded(
            self._lane.run(self._checkins.done(session.identity.user, frame))
        )

    async def location(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await session.bounded(
            self._lane.run(self._checkins.location(session.identity.user, frame))
        )
