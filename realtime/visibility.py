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

import sqlite3
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
            return await self._is_contact(viewer.user, user) or await shared_room(
                self._store, viewer.user, user
            )
        except StoreUnavailable:
            raise ProtocolError(
                "unavailable", "presence: the store is unavailable", retry_after_ms=1000
            ) from None

    async def _is_contact(self, viewer: str, user: str) -> bool:
        doc = await self._store.docs.get("contacts", user)
        contacts: list[dict[str, Any]] = (doc or {}).get("contacts", [])
        return any(c.get("user") == viewer for c in contacts)


async def shared_room(store: Store, a: str, b: str) -> bool:
    """Whether users `a` and `b` are both members of some `room:` channel. The storage
    interface answers only "is X a member of C", so this reads the two known stores directly
    (read only)."""
    memberships: Any = store.memberships
    reader = getattr(memberships, "_r", None)  # SqliteMemberships: the reading connection
    if reader is not None:

        def q(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM memberships a JOIN memberships b ON b.channel = a.channel "
                "AND b.user = ? WHERE a.user = ? AND a.channel LIKE 'room:%' LIMIT 1",
                (b, a),
            ).fetchone()
            return row is not None

        return bool(await reader.run(q))
    col = memberships._col  # MongoMemberships: the collection
    from realtime_safety.storage.mongo_messages import guard

    rooms = await guard(col.distinct("channel", {"user": a, "channel": {"$regex": "^room:"}}))
    if not rooms:
        return False
    found = await guard(col.find_one({"user": b, "channel": {"$in": rooms}}, {"_id": 1}))
    return found is not None
