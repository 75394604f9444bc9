"""Channel operations shared by WebSocket connections and the HTTP server API.

Every store or broker call is bounded by the configured store timeout; a backend that is down
or slow becomes `ProtocolError("unavailable")`, never a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError

from realtime_safety.protocol import ProtocolError
from realtime_safety.storage import Appended, Message, Store, StoreUnavailable

from .broker import BrokerUnavailable
from .hub import Hub

log = logging.getLogger("realtime.channels")

T = TypeVar("T")

SERVER_USER = "@server"  # `from.user` of messages published through the server API


@dataclass(frozen=True, slots=True)
class Replay:
    last_seq: int
    messages: list[Message]
    recovered: bool


LATENCY_HALF_LIFE_S = 0.5  # of the backend latency signal without answers (see slowest_s)


class ChannelService:
    def __init__(
        self,
        store: Store,
        hub: Hub,
        *,
        timeout_s: float,
        recovery_limit: int,
        tag: Callable[[dict[str, Any], str, str, int], None] | None = None,
    ) -> None:
        self.metrics = hub.metrics
        self.store = store
        self.hub = hub
        self._tag = tag  # adds the server's franking tag to a franked envelope
        self._timeout = timeout_s
        self._recovery_limit = recovery_limit
        self.in_flight = 0  # backend calls made for commands, not yet answered (load signal)
        self._calls = itertools.count()
        self._started: dict[int, float] = {}  # call -> when it was made (for `slowest_s`)
        self._latency_s = 0.0  # moving average of answered calls' durations
        self._latency_at = 0.0  # when it last moved

    def slowest_s(self) -> float:
        """How slow the backend is now (a load signal): the longer of the calls' moving
        average and a quarter of the age of the oldest call still waiting (so a store that has
        stopped answering counts before any call comes back, while one slow fsync does not).
        The average halves every LATENCY_HALF_LIFE_S without answers: a node that refuses
        chat because the store was slow makes no calls that could bring it down again, and
        would otherwise refuse for good."""
        waiting = next(iter(self._started.values()), None)  # insertion order: the oldest
        oldest = 0.0 if waiting is None else (time.monotonic() - waiting) / 4
        return max(self._average(time.monotonic()), oldest)

    def _average(self, now: float) -> float:
        return float(self._latency_s * 0.5 ** ((now - self._latency_at) / LATENCY_HALF_LIFE_S))

    async def bounded(self, what: str, call: Awaitable[T]) -> T:
        self.in_flight += 1
        key, started = next(self._calls), time.monotonic()
        self._started[key] = started
        try:
            with self.metrics.backend_seconds.labels(what).time():
                async with asyncio.timeout(self._timeout):
                    return await call
        except TimeoutError:
            raise ProtocolError(
                "unavailable", f"{what}: the store did not answer in time"
            ) from None
        except StoreUnavailable as exc:
            log.warning("%s failed: %s", what, exc)
            raise ProtocolError("unavailable", f"{what}: the store is unavailable") from None
        except (BrokerUnavailable, RedisError, OSError) as exc:
            log.warning("%s failed: %s", what, exc)
            raise ProtocolError("unavailable", f"{what}: the broker is unavailable") from None
        finally:
            self.in_flight -= 1
            del self._started[key]
            now = time.monotonic()
            self._latency_s = self._average(now)
            self._latency_s += 0.1 * (now - started - self._latency_s)
            self._latency_at = now

    async def publish(
        self,
        channel: str,
        user: str,
        device: str | None,
        client_msg_id: str,
        body: dict[str, Any],
    ) -> Appended:
        """Store, then fan out. The caller acknowledges only after this returns."""
        ts = int(time.time() * 1000)
        if self._tag is not None:
            self._tag(body, channel, user, ts)
        appended = await self.bounded(
            "publish",
            self.store.messages.append(channel, user, device, client_msg_id, body, ts),
        )
        # A duplicate is fanned out again: its first attempt may have been stored and never
        # fanned out (the node died, or the store answered after the publish had timed out),
        # and in a channel that then goes quiet no later message would repair the gap. Hubs
        # deliver each seq once, so nobody gets it twice; moderators are not told again.
        try:
            async with asyncio.timeout(self._timeout):
                await self.hub.publish(appended.message, moderators=not appended.duplicate)
        except (BrokerUnavailable, TimeoutError) as exc:
            # Stored, so acknowledged: local sockets get it now, other nodes when the broker
            # takes it again (or from the store on their next message or broker reconnect).
            log.warning("fan-out of %s#%d failed: %s", channel, appended.message.seq, exc)
            self.hub.deliver_local(appended.message)
            self.hub.publish_later(appended.message)
        return appended

    async def replay(self, channel: str, since_seq: int | None) -> Replay:
        """What a subscriber missed: every message after `since_seq`, at most the newest
        `recovery_limit` of them (then `recovered` is False and the client pages history)."""
        last = await self.bounded("subscribe", self.store.messages.last_seq(channel))
        if since_seq is None or since_seq >= last:
            return Replay(last, [], True)
        missed = last - since_seq
        start = since_seq if missed <= self._recovery_limit else last - self._recovery_limit
        messages = await self.bounded(
            "subscribe", self.store.messages.after(channel, start, last - start)
        )
        return Replay(last, messages, missed <= self._recovery_limit)

    async def history(
        self, channel: str, before_seq: int | None, limit: int
    ) -> tuple[list[Message], bool]:
        page = await self.bounded(
            "history", self.store.messages.before(channel, before_seq, limit + 1)
        )
        return page[-limit:], len(page) > limit

    async def read_marker(self, channel: str, user: str) -> int:
        return await self.bounded("history", self.store.read_markers.get(channel, user))

    async def mark_read(self, channel: str, user: str, seq: int) -> int:
        return await self.bounded("read", self.store.read_markers.set(channel, user, seq))

    async def add_member(self, channel: str, user: str) -> bool:
        ts = int(time.time() * 1000)
        return await self.bounded("add member", self.store.memberships.add(channel, user, ts))

    async def remove_member(self, channel: str, user: str) -> bool:
        return await self.bounded("remove member", self.store.memberships.remove(channel, user))

    async def members(self, channel: str, limit: int, after: str | None) -> list[str]:
        return await self.bounded(
            "list members", self.store.memberships.members(channel, limit, after)
        )

    async def typing(self, channel: str, user: str) -> None:
        await self.bounded("typing", self.hub.publish_event(channel, "typing", u=user))
