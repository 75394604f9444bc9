"""The presence ops (docs/protocol.md, "Presence"): `presence` (a channel's members, paged)
and `presence.invisible`; and a session's online status on `user:<id>`, from its
authentication to its end."""

from __future__ import annotations

from typing import Any

from realtime_safety.channels.acl import AccessControl, Action
from realtime_safety.channels.ops import channel_of
from realtime_safety.protocol import Feature, ProtocolError, Reply, Session, arg_int

from .tracker import PresenceTracker


class PresenceOps(Feature):
    def __init__(self, tracker: PresenceTracker, acl: AccessControl) -> None:
        self._tracker = tracker
        self._acl = acl
        self.ops = {"presence": self.presence, "presence.invisible": self.invisible}
        self.shed = frozenset({"presence"})

    async def started(self, session: Session) -> None:
        user = session.identity.user
        await self._tracker.add(f"user:{user}", user)  # online status

    async def ended(self, session: Session) -> None:
        user = session.identity.user
        await self._tracker.remove(f"user:{user}", user)

    async def presence(self, session: Session, frame: dict[str, Any]) -> Reply:
        """Members of a channel, paged (`cursor` from the previous reply, 0 = done). On
        `user:<id>` any user may ask whether <id> is online, unless <id> is invisible."""
        ch = channel_of(frame)
        cursor = arg_int(frame, "cursor") or 0
        limit = arg_int(frame, "limit", minimum=1, maximum=1000) or 100
        if ch.namespace == "user":
            if ch.rest != session.identity.user and await session.bounded(
                self._tracker.store.is_invisible(ch.rest)
            ):
                return {"channel": ch.name, "members": [], "cursor": 0, "total": 0}
        else:
            await self._acl.check(session.identity, ch, Action.SUBSCRIBE)
        page = await session.bounded(self._tracker.members(ch.name, cursor, limit))
        members = [{"user": user, "since": since} for user, since in page.members]
        return {"channel": ch.name, "members": members, "cursor": page.cursor, "total": page.total}

    async def invisible(self, session: Session, frame: dict[str, Any]) -> Reply:
        invisible = frame.get("invisible")
        if not isinstance(invisible, bool):
            raise ProtocolError("bad_request", "'invisible' must be true or false")
        await session.bounded(self._tracker.store.set_invisible(session.identity.user, invisible))
        return {"invisible": invisible}
