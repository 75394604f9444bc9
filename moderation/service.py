"""Moderation (docs/protocol-v1.md section 8): watching channel streams, deleting, banning,
reports and the audit log. Every op here requires the `moderator` role and every action is audited.

- Watching: every published message is also sent once to one moderation stream (broker topic
  `rt:mod`); a node subscribes to that single topic only while it has local watchers and
  matches their glob patterns locally, so `room:*` never means one Redis subscription per room.
  Watchers are not subscribers: they do not appear in presence.
- Deleting: the message becomes a tombstone in history; `deleted` is pushed to the channel's
  subscribers and to watchers on every node.
- Banning: per channel (the user's subscriptions end with `kicked`, subscribe/publish are
  refused) or global (connections closed 4009, `auth` refused), optionally for a duration;
  enforced on every node through a control event, and on every reconnect from the store.
- Audit: an append-only log (`audit` documents, keyed by time), read through `mod.audit` and
  `GET /v1/audit`.
"""

from __future__ import annotations

import fnmatch
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from realtime_safety.channels.broker import BrokerUnavailable
from realtime_safety.channels.hub import Hub
from realtime_safety.channels.names import parse_channel
from realtime_safety.channels.ops import Spawn
from realtime_safety.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_BANNED,
    Frame,
    Identity,
    ProtocolError,
    Session,
    Sessions,
    valid_user_id,
)
from realtime_safety.storage import DocStore, MessageStore

MAX_PATTERNS = 20

log = logging.getLogger("realtime.moderation")

# (user, channel, reason, push): end the user's subscriptions to the channel on this node
Kick = Callable[..., None]


def _now() -> int:
    return int(time.time() * 1000)


class Moderation:
    def __init__(
        self,
        docs: DocStore,
        messages: MessageStore,
        hub: Hub,
        sessions: Sessions,
        *,
        kick: Kick,
        broadcast: Callable[[dict[str, Any]], Awaitable[None]],
        spawn: Spawn,
    ) -> None:
        self._docs = docs
        self._messages = messages
        self._hub = hub
        self._sessions = sessions
        self._kick = kick
        self._broadcast = broadcast
        self._spawn = spawn
        self._watchers: dict[Session, list[str]] = {}
        # (user, channel or "*") -> (banned until ms or None, reason, cached until monotonic)
        # bans ("<user>|<channel or *>") and token floors (user), read through this cache
        self._cached = _Cached(docs)

    # --- audit ------------------------------------------------------------------------

    async def audit(self, actor: str, action: str, **details: Any) -> None:
        ts = _now()
        await self._docs.insert(
            "audit",
            f"{ts:015d}|{uuid.uuid4().hex[:8]}",
            {"ts": ts, "actor": actor, "action": action, **details},
            ix=ts,
        )

    async def audit_log(self, since_ms: int, limit: int) -> list[dict[str, Any]]:
        entries = [
            d for _, d in await self._docs.below("audit", 2**62, 100_000) if d["ts"] >= since_ms
        ]
        return [{k: v for k, v in e.items() if k != "_v"} for e in entries[-limit:]]

    # --- watching ---------------------------------------------------------------------

    async def watch(self, session: Session, pattern: object) -> list[str]:
        if not isinstance(pattern, str) or not 1 <= len(pattern) <= 255:
            raise ProtocolError("bad_request", "'pattern' must be a glob such as room:*")
        patterns = self._watchers.get(session, [])
        if pattern not in patterns:
            if len(patterns) >= MAX_PATTERNS:
                raise ProtocolError("too_large", f"at most {MAX_PATTERNS} patterns")
            first = not self._watchers
            self._watchers[session] = [*patterns, pattern]
            if first:
                await self._hub.watch(True)
        return self._watchers[session]

    async def unwatch(self, session: Session, pattern: object | None) -> list[str]:
        patterns = [p for p in self._watchers.get(session, []) if pattern not in (None, p)]
        if patterns:
            self._watchers[session] = patterns
        elif self._watchers.pop(session, None) is not None and not self._watchers:
            await self._hub.watch(False)
        return patterns

    async def revoke(self, session: Session, reason: str) -> None:
        """`session` is no moderator any more (a `refresh`): its watch patterns end, with a
        `mod.unwatched` push naming them."""
        patterns = self._watchers.get(session)
        if not patterns:
            return
        session.send({"push": "mod.unwatched", "patterns": list(patterns), "reason": reason})
        await self.unwatch(session, None)

    def on_stream(self, channel: str, frame: Frame) -> None:
        """A message or deletion from the moderation stream: to matching local watchers."""
        for session, patterns in list(self._watchers.items()):
            if any(fnmatch.fnmatchcase(channel, p) for p in patterns):
                session.push(frame)

    # --- delete -----------------------------------------------------------------------

    async def delete(self, actor: str, frame: dict[str, Any]) -> dict[str, Any]:
        ch = parse_channel(frame.get("channel"))
        seq = frame.get("seq")
        reason = frame.get("reason")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ProtocolError("bad_request", "'seq' must be a positive integer")
        if not isinstance(reason, str) or not 1 <= len(reason) <= 500:
            raise ProtocolError("bad_request", "'reason' must be 1-500 characters")
        tombstone = {"v": 1, "alg": "deleted", "reason": reason, "by": actor, "ts": _now()}
        if not await self._messages.redact(ch.name, seq, tombstone):
            raise ProtocolError("not_found", f"no message {seq} in {ch.name}")
        await self.audit(actor, "delete", channel=ch.name, seq=seq, reason=reason)
        await self._hub.publish_event(ch.name, "deleted", s=seq)
        await self._hub.publish_mod({"push": "deleted", "channel": ch.name, "seq": seq})
        return {"channel": ch.name, "seq": seq}

    # --- bans -------------------------------------------------------------------------

    async def ban(self, actor: str, frame: dict[str, Any]) -> dict[str, Any]:
        user = frame.get("user")
        if not valid_user_id(user):
            raise ProtocolError("bad_request", "'user' must be a user id")
        assert isinstance(user, str)
        channel = frame.get("channel")
        if channel is not None:
            channel = parse_channel(channel).name
        duration = frame.get("duration_s")
        if duration is not None and (
            isinstance(duration, bool)
            or not isinstance(duration, int)
            or not 1 <= duration <= 10 * 365 * 86400
        ):
            raise ProtocolError("bad_request", "'duration_s' must be 1 s to 10 years")
        reason = frame.get("reason")
        if not isinstance(reason, str) or not 1 <= len(reason) <= 500:
            raise ProtocolError("bad_request", "'reason' must be 1-500 characters")
        until = _now() + duration * 1000 if duration else None
        await self._docs.put(
            "bans",
            f"{user}|{channel or '*'}",
            {"user": user, "channel": channel, "until": until, "reason": reason, "by": actor},
            ix=until,
        )
        await self.audit(actor, "ban", user=user, channel=channel, until=until, reason=reason)
        await self._broadcast({"t": "ban", "u": user, "c": channel, "reason": reason})
        if channel is not None and channel.startswith("room:"):
            # as for a removal: the members left rotate the key she may hold
            try:
                await self._hub.publish_event(channel, "rekey")
            except BrokerUnavailable as exc:
                log.warning("rekey after a ban on %s not published: %s", channel, exc)
        return {"user": user, "channel": channel, "until": until}

    async def unban(self, actor: str, frame: dict[str, Any]) -> dict[str, Any]:
        user, channel = frame.get("user"), frame.get("channel")
        if not isinstance(user, str):
            raise ProtocolError("bad_request", "'user' is required")
        if channel is not None:
            channel = parse_channel(channel).name
        removed = await self._docs.delete("bans", f"{user}|{channel or '*'}")
        await self.audit(actor, "unban", user=user, channel=channel)
        await self._broadcast({"t": "unban", "u": user, "c": channel})
        return {"user": user, "channel": channel, "removed": removed}

    async def banned(self, user: str, channel: str | None) -> str | None:
        """The reason `user` is banned from `channel` (or everywhere, channel None)."""
        for scope in ("*", channel) if channel else ("*",):
            doc = await self._cached.get("bans", f"{user}|{scope}")
            if doc is not None and (doc["until"] or 2**62) > _now():
                return str(doc["reason"])
        return None

    async def revoke_tokens(self, actor: str, user: str) -> dict[str, Any]:
        """Every token of `user` issued up to now stops working, on every node: its sessions
        close (4003, "token revoked") and it is refused on `auth` and `refresh`. Tokens the
        app's backend issues after this (a demoted moderator's new one) work."""
        if not valid_user_id(user):
            raise ProtocolError("bad_request", "'user' must be a user id")
        # tokens of earlier seconds (`iat` is in seconds): a new token the backend issues at
        # once, in this same second, is accepted (so is an old one of this very second)
        before = int(time.time())
        await self._docs.put("token_floors", user, {"user": user, "before": before})
        await self.audit(actor, "revoke_tokens", user=user, before=before)
        await self._broadcast({"t": "tokens", "u": user, "before": before})
        return {"user": user, "revoked_before": before}

    async def check_issued(self, identity: Identity) -> None:
        """`unauthorized` for a token issued before the user's tokens were revoked (a token
        without `iat` counts as issued at the start of time)."""
        doc = await self._cached.get("token_floors", identity.user)
        if doc is not None and (identity.issued_at or 0) < int(doc["before"]):
            raise ProtocolError("unauthorized", "token revoked")

    def on_ban(self, event: dict[str, Any]) -> None:
        """A ban, an unban or a token revocation made on any node: forget cached answers,
        enforce on local sockets."""
        user, channel = event.get("u"), event.get("c")
        if not isinstance(user, str):
            return
        if event.get("t") == "tokens":
            self._cached.forget("token_floors", user)
            before = event.get("before")
            for session in self._sessions.of_user(user):
                if isinstance(before, int) and (session.identity.issued_at or 0) < before:
                    session.close(CLOSE_AUTH_FAILED, "token revoked")
            return
        self._cached.forget("bans", f"{user}|{channel or '*'}")
        if event.get("t") != "ban":
            return
        if channel is not None:
            self._kick(user, channel, "banned", push="kicked")
            return
        for session in self._sessions.of_user(user):
            if not session.restricted:  # a safety-only session stays: a ban limits chat
                session.close(CLOSE_BANNED, "banned")

    def forget(self, session: Session) -> None:
        """A watcher's session ended: its patterns go (and the stream, if it was the last)."""
        if session in self._watchers:
            self._spawn(self.unwatch(session, None), "mod-unwatch")


class _Cached:
    """Documents read through a cache: each answer (a document, or its absence) is kept
    `TTL_S`, so a node that missed a broadcast is right again within that; a broadcast
    `forget`s at once. At most `LIMIT` answers, the oldest dropped first."""

    TTL_S = 30.0
    LIMIT = 100_000

    def __init__(self, docs: DocStore) -> None:
        self._docs = docs
        self._answers: OrderedDict[tuple[str, str], tuple[dict[str, Any] | None, float]] = (
            OrderedDict()
        )

    async def get(self, coll: str, key: str) -> dict[str, Any] | None:
        found = self._answers.get((coll, key))
        if found is None or found[1] < time.monotonic():
            found = (await self._docs.get(coll, key), time.monotonic() + self.TTL_S)
            self._answers[coll, key] = found
            if len(self._answers) > self.LIMIT:
                self._answers.popitem(last=False)
        return found[0]

    def forget(self, coll: str, key: str) -> None:
        self._answers.pop((coll, key), None)
