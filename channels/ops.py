"""The channel ops (docs/protocol.md, "Channels"): subscribe, unsubscribe, publish, history,
typing, read and members. Each op checks the caller's access first (`AccessControl`), on every
command."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from realtime_safety.protocol import (
    Feature,
    Identity,
    ProtocolError,
    Reply,
    Session,
    Sessions,
    arg_int,
    arg_str,
    require_str,
)

from .acl import AccessControl, Action
from .body import ALG_ENVELOPE, ALG_MEGOLM, parse_body
from .hub import Hub, message_item
from .metrics import ChannelMetrics
from .names import ChannelName, parse_channel
from .service import ChannelService
from .subscriptions import Subscription, Subscriptions

# (user, channel, envelope's client_msg_id, body) -> None, or ProtocolError if the envelope's
# signature does not verify against the sender's registered device (crypto.KeyDirectory)
EnvelopeCheck = Callable[[str, str, str, dict[str, Any]], Awaitable[None]]
# runs a coroutine as a background task owned by the node (logged if it fails)
Spawn = Callable[[Coroutine[Any, Any, object], str], None]


class Roster(Protocol):
    """Who is in a channel (the presence tracker)."""

    async def add(self, channel: str, user: str) -> None: ...

    async def remove(self, channel: str, user: str) -> None: ...


@dataclass(frozen=True)
class ChannelLimits:
    max_subscriptions: int
    max_body_bytes: int
    max_pending: int  # live messages held back per subscription while its replay is read
    plaintext_namespaces: Collection[str]


def channel_of(frame: dict[str, Any]) -> ChannelName:
    return parse_channel(frame.get("channel"))


class ChannelOps(Feature):
    def __init__(
        self,
        *,
        acl: AccessControl,
        hub: Hub,
        service: ChannelService,
        roster: Roster,
        sessions: Sessions,
        verify_envelope: EnvelopeCheck,
        limits: ChannelLimits,
        metrics: ChannelMetrics,
        spawn: Spawn,
    ) -> None:
        self._acl = acl
        self._hub = hub
        self._service = service
        self._roster = roster
        self._sessions = sessions
        self._verify_envelope = verify_envelope
        self._limits = limits
        self._metrics = metrics
        self._spawn = spawn
        self._subs: dict[Session, Subscriptions] = {}
        self._typing_at: dict[tuple[str, str], float] = {}
        self.ops = {
            "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe,
            "publish": self.publish,
            "history": self.history,
            "typing": self.typing,
            "read": self.read,
            "members": self.members,
        }
        # Under overload the ops that make work for others (a publish fans out to every
        # member, typing too) or read history wait for better times; subscribing (a
        # reconnecting phone resuming its rooms), read markers and leaving do not.
        self.shed = frozenset({"publish", "typing", "history", "members"})

    def of(self, session: Session) -> Subscriptions:
        subs = self._subs.get(session)
        if subs is None:
            subs = self._subs[session] = Subscriptions(session, self._limits.max_pending)
        return subs

    async def ended(self, session: Session) -> None:
        subs = self._subs.pop(session, None)
        if subs is None:
            return
        channels = list(subs.by_channel)
        subs.by_channel.clear()
        for channel in channels:
            self._hub.remove(channel, subs)
        user = session.identity.user
        for channel in channels:
            await self._roster.remove(channel, user)

    def kick(self, user: str, channel: str, reason: str, *, push: str = "unsubscribed") -> None:
        """End `user`'s subscriptions to `channel` on this node (removed from the room:
        `unsubscribed`; banned: `kicked`), with a push saying why."""
        for session in self._sessions.of_user(user):
            subs = self._subs.get(session)
            if subs is not None and subs.by_channel.pop(channel, None) is not None:
                self._hub.remove(channel, subs)
                self._spawn(self._roster.remove(channel, user), "presence-remove")
                session.send({"push": push, "channel": channel, "reason": reason})

    async def revoked(
        self, session: Session, who: Identity, namespace: str | None = None
    ) -> list[str]:
        """The channels `session` is subscribed to (those of `namespace` only, if given) that
        `who` (its identity after a `refresh`) may no longer subscribe to: the subscribe op's
        own check, run again."""
        subs = self._subs.get(session)
        if subs is None:
            return []
        return [
            name
            for name in list(subs.by_channel)
            if namespace is None or name.startswith(f"{namespace}:")
            if not await self._acl.allows(who, parse_channel(name), Action.SUBSCRIBE)
        ]

    def end(self, session: Session, channels: list[str], reason: str) -> None:
        """End these subscriptions of `session`, each with an `unsubscribed` push saying why."""
        subs = self._subs.get(session)
        if subs is None:
            return
        user = session.identity.user
        for channel in channels:
            if subs.by_channel.pop(channel, None) is not None:
                self._hub.remove(channel, subs)
                self._spawn(self._roster.remove(channel, user), "presence-remove")
                session.send({"push": "unsubscribed", "channel": channel, "reason": reason})

    # --- the ops ----------------------------------------------------------------------

    async def subscribe(self, session: Session, frame: dict[str, Any]) -> Reply:
        ch = channel_of(frame)
        since = arg_int(frame, "since_seq")
        await self._acl.check(session.identity, ch, Action.SUBSCRIBE)
        subs = self.of(session)
        if ch.name in subs:
            raise ProtocolError("conflict", f"already subscribed to {ch.name}")
        if len(subs) >= self._limits.max_subscriptions:
            raise ProtocolError("too_large", "subscription limit reached")
        sub = subs.by_channel[ch.name] = Subscription()
        try:
            await self._hub.add(ch.name, subs)
            replay = await self._service.replay(ch.name, since)
        except BaseException:
            if subs.by_channel.pop(ch.name, None) is not None:
                self._hub.remove(ch.name, subs)
            raise
        session.after_reply(lambda: subs.replayed(ch.name, sub, replay))
        await self._roster.add(ch.name, session.identity.user)
        return {"channel": ch.name, "last_seq": replay.last_seq, "recovered": replay.recovered}

    async def unsubscribe(self, session: Session, frame: dict[str, Any]) -> Reply:
        ch = channel_of(frame)
        subs = self._subs.get(session)
        if subs is not None and subs.by_channel.pop(ch.name, None) is not None:
            self._hub.remove(ch.name, subs)
            await self._roster.remove(ch.name, session.identity.user)
        return {}

    async def publish(self, session: Session, frame: dict[str, Any]) -> Reply:
        start = time.perf_counter()
        ch = channel_of(frame)
        cmid = require_str(frame, "client_msg_id", max_len=64)
        limits = self._limits
        body = parse_body(
            frame.get("body"),
            session.codec,
            plaintext_allowed=ch.namespace in limits.plaintext_namespaces,
            max_bytes=limits.max_body_bytes,
        )
        who = session.identity
        await self._acl.check(who, ch, Action.PUBLISH)
        if body["alg"] in (ALG_ENVELOPE, ALG_MEGOLM):
            await session.bounded(self._verify_envelope(who.user, ch.name, cmid, body))
        device = body.get("device") or who.device
        appended = await self._service.publish(ch.name, who.user, device, cmid, body)
        reply: Reply = {"seq": appended.message.seq, "ts": appended.message.ts}
        if appended.duplicate:
            reply["duplicate"] = True
        else:
            self._metrics.published += 1
        self._metrics.publish_seconds.observe(time.perf_counter() - start)
        return reply

    async def history(self, session: Session, frame: dict[str, Any]) -> Reply:
        ch = channel_of(frame)
        before = arg_int(frame, "before_seq", minimum=1)
        limit = arg_int(frame, "limit", minimum=1, maximum=200) or 50
        await self._acl.check(session.identity, ch, Action.HISTORY)
        messages, has_more = await self._service.history(ch.name, before, limit)
        read_seq = await self._service.read_marker(ch.name, session.identity.user)
        return {
            "channel": ch.name,
            "messages": [message_item(m) for m in messages],
            "has_more": has_more,
            "read_seq": read_seq,
        }

    async def typing(self, session: Session, frame: dict[str, Any]) -> Reply:
        ch = channel_of(frame)
        user = session.identity.user
        await self._acl.check(session.identity, ch, Action.TYPING)
        wait = self._typing_wait(user, ch.name)
        if wait:
            raise ProtocolError(
                "rate_limited",
                "one typing notice per second per user and channel",
                retry_after_ms=int(wait * 1000) + 1,
            )
        await self._service.typing(ch.name, user)
        return {}

    def _typing_wait(self, user: str, channel: str) -> float:
        """0 if `user` may send a typing notice on `channel` now (one per second per user and
        channel on this node), else seconds to wait."""
        now = time.monotonic()
        wait = 1.0 - (now - self._typing_at.get((user, channel), -1.0))
        if wait > 0:
            return wait
        if len(self._typing_at) > 100_000:
            self._typing_at = {k: v for k, v in self._typing_at.items() if now - v < 1.0}
        self._typing_at[(user, channel)] = now
        return 0.0

    async def read(self, session: Session, frame: dict[str, Any]) -> Reply:
        ch = channel_of(frame)
        seq = arg_int(frame, "seq")
        if seq is None:
            raise ProtocolError("bad_request", "'seq' is required")
        await self._acl.check(session.identity, ch, Action.READ)
        stored = await self._service.mark_read(ch.name, session.identity.user, seq)
        return {"channel": ch.name, "read_seq": stored}

    async def members(self, session: Session, frame: dict[str, Any]) -> Reply:
        """Members of a room (to share keys with them), paged by `after`."""
        ch = channel_of(frame)
        if ch.namespace != "room":
            raise ProtocolError("bad_request", "only room: channels have a member list")
        after = arg_str(frame, "after", max_len=128, required=False)
        limit = arg_int(frame, "limit", minimum=1, maximum=1000) or 1000
        await self._acl.check(session.identity, ch, Action.HISTORY)
        page = await self._service.members(ch.name, limit, after)
        # a banned member is no member to share keys with: others never see her
        members = [m for m in page if not await self._acl.banned(m, ch.name)]
        return {
            "channel": ch.name,
            "members": members,
            "next": page[-1] if len(page) == limit else None,
        }
