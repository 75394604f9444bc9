"""The presence ops (docs/protocol.md, "Presence"): `presence` (a channel's members, paged)
and `presence.invisible`; and a session's online status on `user:<id>`, from its
authentication to its end.

Who may see what:
- a user's online status (`user:<id>`) only for those the node's `may_see` allows (by
  default the user, people who share a room with them, their emergency contacts and
  moderators: `RT_PRESENCE_VISIBILITY`); others get `forbidden`, whether or not <id> is online;
- other channels: those who may subscribe to them (the channels' access rule);
- an invisible user is seen by nobody but themself, on any channel: not listed, not counted,
  and their joins and leaves are not pushed (`PresenceTracker`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from realtime_safety.channels.acl import AccessControl, Action
from realtime_safety.channels.ops import channel_of
from realtime_safety.protocol import Feature, Identity, ProtocolError, Reply, Session, arg_int

from .tracker import PresenceTracker

# (viewer, user) -> may the viewer see whether the user is online; decided by the node (from
# memberships and emergency contacts), so presence knows nothing of rooms or alerts.
MaySee = Callable[[Identity, str], Awaitable[bool]]


async def _everyone(viewer: Identity, user: str) -> bool:
    return True


class PresenceOps(Feature):
    def __init__(
        self, tracker: PresenceTracker, acl: AccessControl, may_see: MaySee = _everyone
    ) -> None:
        self._tracker = tracker
        self._acl = acl
        self._may_see = may_see
        self.ops = {"presence": self.presence, "presence.invisible": self.invisible}
        self.shed = frozenset({"presence"})

    async def started(self, session: Session) -> None:
        user = session.identity.user
        await self._tracker.add(f"user:{user}", user)  # online status

    async def ended(self, session: Session) -> None:
        user = session.identity.user
        await self._tracker.remove(f"user:{user}", user)

    async def presence(self, session: Session, frame: dict[str, Any]) -> Reply:
        """Members of a channel, paged (`cursor` from the previous reply, 0 = done), as the
        caller may see them."""
        ch = channel_of(frame)
        cursor = arg_int(frame, "cursor") or 0
        limit = arg_int(frame, "limit", minimum=1, maximum=1000) or 100
        viewer = session.identity
        if ch.namespace == "user":
            if ch.rest != viewer.user and not await session.bounded(self._may_see(viewer, ch.rest)):
                raise ProtocolError("forbidden", f"the presence of {ch.rest} is private")
        else:
            await self._acl.check(viewer, ch, Action.SUBSCRIBE)
        page = await session.bounded(
            self._tracker.members_seen_by(ch.name, cursor, limit, viewer.user)
        )
        members = [{"user": user, "since": since} for user, since in page.members]
        return {"channel": ch.name, "members": members, "cursor": page.cursor, "total": page.total}

    async def invisible(self, session: Session, frame: dict[str, Any]) -> Reply:
        invisible = frame.get("invisible")
        if not isinstance(invisible, bool):
            raise ProtocolError("bad_request", "'invisible' must be true or false")
        await session.bounded(self._tracker.set_invisible(session.identity.user, invisible))
        return {"invisible": invisible}
