"""Who may do what on which channel (docs/protocol-v1.md section 4), checked on every operation.

| namespace     | subscribe / history / presence | publish (clients) | typing / read |
|---------------|--------------------------------|-------------------|---------------|
| `room:`       | members                        | members           | members       |
| `public:`     | any authenticated user         | any               | any           |
| `user:<id>`   | user `<id>` only               | nobody (server)   | read: `<id>`  |
| `alert:<id>`  | owner, recipients, moderators  | nobody (server)   | no            |

A ban (from the channel, or global) refuses every action on the channel: subscribe, publish,
history, typing, read markers, presence, members, reports, key fetches, and key shares to
the banned user's devices. A removed member is no member, so the same holds for removal.
What a session already holds is checked again when its identity changes (`refresh`:
`ChannelOps.revoked`, realtime/access.py), with `SUBSCRIBE` as the subscribe op does.

Room membership is read from the store and cached per node; every node drops its cached
entry when the membership changes (a control message on the broker), so removal takes
effect everywhere within one pub/sub hop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from enum import Enum

from realtime_safety.protocol import Identity, ProtocolError
from realtime_safety.storage import MembershipStore, StoreUnavailable

from .names import ChannelName


class Action(Enum):
    SUBSCRIBE = "subscribe"
    PUBLISH = "publish"
    HISTORY = "history"
    TYPING = "typing"
    READ = "read"


class MembershipCache:
    """A bounded per-node cache of (channel, user) -> is member."""

    def __init__(self, store: MembershipStore, size: int = 100_000) -> None:
        self._store = store
        self._size = size
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()

    async def is_member(self, channel: str, user: str) -> bool:
        key = (channel, user)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        result = await self._store.is_member(channel, user)
        self._cache[key] = result
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return result

    def invalidate(self, channel: str, user: str) -> None:
        self._cache.pop((channel, user), None)

    def clear(self) -> None:
        self._cache.clear()


class AccessControl:
    def __init__(
        self,
        memberships: MembershipCache,
        alert_access: Callable[[str, str, frozenset[str]], Awaitable[bool]] | None = None,
        ban_reason: Callable[[str, str | None], Awaitable[str | None]] | None = None,
    ) -> None:
        self.memberships = memberships
        self.alert_access = alert_access  # (user, alert id, roles) -> may see it
        self.ban_reason = ban_reason  # (user, channel) -> why they are banned, or None

    async def check(self, who: Identity, channel: ChannelName, action: Action) -> None:
        """Return if allowed; raise `forbidden` otherwise, `unavailable` when the store that
        holds bans and memberships does not answer (so the client retries; not `internal`)."""
        try:
            await self._check(who, channel, action)
        except StoreUnavailable:
            raise ProtocolError(
                "unavailable", f"access check on {channel.name}: the store is unavailable"
            ) from None

    async def allows(self, who: Identity, channel: ChannelName, action: Action) -> bool:
        """Whether `who` may do `action` on `channel` (`unavailable` if the store cannot say)."""
        try:
            await self.check(who, channel, action)
        except ProtocolError as err:
            if err.code == "forbidden":
                return False
            raise
        return True

    async def banned(self, user: str, channel: str) -> bool:
        """Whether `user` is banned from `channel` (or everywhere)."""
        if self.ban_reason is None:
            return False
        try:
            return await self.ban_reason(user, channel) is not None
        except StoreUnavailable:
            raise ProtocolError(
                "unavailable", f"ban check on {channel}: the store is unavailable"
            ) from None

    async def _check(self, who: Identity, channel: ChannelName, action: Action) -> None:
        if self.ban_reason is not None:  # every action: a ban is a ban
            reason = await self.ban_reason(who.user, channel.name)
            if reason is not None:
                raise ProtocolError("forbidden", f"banned from {channel.name}: {reason}")
        ns = channel.namespace
        if ns == "public":
            return
        if ns == "room":
            if await self.memberships.is_member(channel.name, who.user):
                return
            raise ProtocolError("forbidden", f"not a member of {channel.name}")
        if ns == "user":
            if channel.rest == who.user and action in (
                Action.SUBSCRIBE,
                Action.HISTORY,
                Action.READ,
            ):
                return
            if action is Action.PUBLISH:
                raise ProtocolError("forbidden", "only the server publishes to user: channels")
            raise ProtocolError("forbidden", f"{channel.name} belongs to another user")
        if ns == "alert":
            if action in (Action.SUBSCRIBE, Action.HISTORY):
                if who.is_moderator:
                    return
                if self.alert_access is not None and await self.alert_access(
                    who.user, channel.rest, frozenset(who.roles)
                ):
                    return
            raise ProtocolError("forbidden", f"not a recipient of {channel.name}")
        raise ProtocolError("forbidden", f"no access to {channel.name}")
