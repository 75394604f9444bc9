"""The alert ops (docs/protocol.md, "Safety alerts"): alert.trigger, alert.location,
alert.ack, alert.received (the recipient's app has it), alert.resolve, alert.status,
location.share (responders) and mod.alerts (moderators). Every one is a bounded backend
call (a store that does not answer is `unavailable`, never a hang) run on the alert
service's own lane (alerts.lane)."""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from realtime_safety.protocol import Feature, ProtocolError, Reply, Session, moderator

from .service import AlertService

T = TypeVar("T")


class AlertOps(Feature):
    def __init__(self, service: AlertService) -> None:
        self._svc = service
        self.ops = {
            "alert.trigger": self.trigger,
            "alert.location": self.location,
            "alert.ack": self.ack,
            "alert.received": self.received,
            "alert.resolve": self.resolve,
            "alert.status": self.status,
            "location.share": self.share_location,
            "mod.alerts": self.active,
            "alert.cancel": self.cancel,
            "alert.trail": self.trail,
        }
        # An SOS starts on the lane as its frame arrives, not a turn of the node's loop later.
        self.urgent = {"alert.trigger": self.start_trigger}

    async def _call(self, session: Session, call: Coroutine[Any, Any, T]) -> T:
        return await session.bounded(self._svc.lane.run(call))

    async def trigger(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await self._call(session, self._svc.trigger(session.identity.user, frame))

    def start_trigger(self, session: Session, frame: dict[str, Any]) -> Awaitable[Reply]:
        return self._svc.lane.begin(self._svc.trigger(session.identity.user, frame))

    async def location(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await self._call(session, self._svc.location(session.identity.user, frame))

    # A recipient's ops (ack, received, trail) follow `alerts.views.still_alerted`, with the
    # caller's role now: someone alerted as a nearby responder acts on it while still one.
    async def ack(self, session: Session, frame: dict[str, Any]) -> Reply:
        who = session.identity
        ack = self._svc.ack(who.user, frame, responder="responder" in who.roles)
        return await self._call(session, ack)

    async def received(self, session: Session, frame: dict[str, Any]) -> Reply:
        who, receipts = session.identity, self._svc.delivery.receipts
        received = receipts.received(who.user, frame, responder="responder" in who.roles)
        return await self._call(session, received)

    async def resolve(self, session: Session, frame: dict[str, Any]) -> Reply:
        who = session.identity
        return await self._call(session, self._svc.resolve(who.user, who.is_moderator, frame))

    async def status(self, session: Session, frame: dict[str, Any]) -> Reply:
        who = session.identity
        return await self._call(session, self._svc.status(who.user, who.is_moderator, frame))

    async def share_location(self, session: Session, frame: dict[str, Any]) -> Reply:
        if "responder" not in session.identity.roles:
            raise ProtocolError("forbidden", "only responders share their location")
        return await self._call(session, self._svc.share_location(session.identity.user, frame))

    async def active(self, session: Session, frame: dict[str, Any]) -> Reply:
        moderator(session)
        return {"alerts": await self._call(session, self._svc.active())}

    async def cancel(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await self._call(session, self._svc.cancel(session.identity.user, frame))

    async def trail(self, session: Session, frame: dict[str, Any]) -> Reply:
        who = session.identity
        trail = self._svc.trail(
            who.user, who.is_moderator, frame, responder="responder" in who.roles
        )
        return await self._call(session, trail)
