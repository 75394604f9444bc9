"""Who may see whether a user is online (`RT_PRESENCE_VISIBILITY`), decided for the presence
ops from what only the node knows: room memberships and the emergency contacts the alert
service keeps (store documents `contacts`: owner -> {"contacts": [{"user"?, "phone"?, "tier"}]}).

`related` (the default): the user themself, moderators, the user's emergency contacts (those
with an app account) and anyone who shares a room (a `room:` membership) with the user.
`everyone`: any authenticated user (the behaviour before issue 23).

Every answer reads the store (no cache), so access ends as soon as the membership or the
contact does. Reads only.
"""

from __future__ import annotations

from typing import Any

from realtime_safety.protocol import Identity, ProtocolError
from realtime_safety.storage import Store, StoreUnavailable


class PresenceVisibility:
    def __init__(self, store: Store, mode: str) -> None:
        self._store = store
        self._mode = mode

    async def may_see(self, viewer: Identity, user: str) -> bool:
        if self._mode == "everyone" or viewer.user == user or viewer.is_moderator:
            return True
        try:
            return await self._is_contact(
                viewer.user, user
            ) or await self._store.memberships.shared(viewer.user, user, "room:")
        except StoreUnavailable:
            raise ProtocolError(
                "unavailable", "presence: the store is unavailable", retry_after_ms=1000
            ) from None

    async def _is_contact(self, viewer: str, user: str) -> bool:
        doc = await self._store.docs.get("contacts", user)
        contacts: list[dict[str, Any]] = (doc or {}).get("contacts", [])
        return any(c.get("user") == viewer for c in contacts)
