"""A node's side of presence: which users its own sockets hold, reported to the shared store.

- A user counts once per node however many local connections they have; the store is told
  only on a user's first local subscription to a channel and after their last one goes.
- Join and leave calls made in the same moment are sent together (one pipeline), so a burst
  of 1,000 joins, or a disconnect with 500 subscriptions, costs a few round trips.
- The node heartbeats every `heartbeat_s`; survivors reap the entries of a node silent for
  `node_timeout_s` (one survivor per dead node, by a claim), pushing each `leave` once.
- If the store restarted (Redis lost its data) the node silently restores its entries; if the
  store forgot only this node (it was reaped while stalled) the node reconciles and pushes joins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .store import Entry, Page, PresenceStore

log = logging.getLogger("realtime.presence")

Publish = Callable[[str, str, str], Awaitable[None]]  # (channel, "join"|"leave", user)


class _Batch:
    """Joins and leaves made while a flush is in flight go together in the next one, in the
    order they were made (a quick subscribe-unsubscribe must not reach the store reversed)."""

    def __init__(self, store: PresenceStore, node: str) -> None:
        self._store = store
        self._node = node
        self._queue: list[tuple[bool, Entry, asyncio.Future[int]]] = []
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0

    async def __call__(self, joining: bool, entry: Entry) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((joining, entry, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush(), name="presence-batch")
        return await asyncio.shield(fut)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the calls of this moment join the batch
        while self._queue:
            # the longest run of one kind at the head of the queue
            joining = self._queue[0][0]
            run = 0
            while run < len(self._queue) and run < 1000 and self._queue[run][0] == joining:
                run += 1
            batch, self._queue = self._queue[:run], self._queue[run:]
            entries = [entry for _, entry, _ in batch]
            try:
                if joining:
                    results = await self._store.join(self._node, entries, _now())
                else:
                    results = await self._store.leave(self._node, entries)
            except Exception as exc:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.flushes += 1
            for (_, _, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class PresenceTracker:
    def __init__(
        self,
        store: PresenceStore,
        node: str,
        publish: Publish,
        *,
        heartbeat_s: float = 5.0,
        node_timeout_s: float = 15.0,
        push_limit: int = 200,
    ) -> None:
        self.store = store
        self.node = node
        self._publish = publish
        self._heartbeat_s = heartbeat_s
        self._node_timeout_s = node_timeout_s
        self._push_limit = push_limit
        self._local: dict[str, dict[str, int]] = {}  # channel -> user -> local connections
        self._batch = _Batch(store, node)
        self._instance: str | None = None
        self._dirty = False  # a store call failed: reconcile on the next heartbeat
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self._instance = await self.store.instance()
            await self.store.heartbeat(self.node, self._node_timeout_s)
        except Exception as exc:
            log.warning("presence store unavailable at start (%s); will retry", exc)
            self._dirty = True
        self._loop = asyncio.create_task(self._heartbeat_loop(), name="presence-heartbeat")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        self._batch.cancel()
        try:  # a clean exit: nobody needs to reap us
            # Everything the store holds for us, not only what our sockets hold: an entry
            # whose leave failed and was not reconciled yet would otherwise stay for good
            # (forget_node below leaves survivors nothing to reap).
            held = await self.store.entries_of(self.node)
            entries = sorted(set(self._entries()) | set(held))
            for (channel, user), left in zip(
                entries, await self.store.leave(self.node, entries), strict=True
            ):
                if self._pushes(left):
                    await self._announce(channel, "leave", user)
            await self.store.forget_node(self.node)
        except Exception as exc:
            log.warning("presence not withdrawn on stop (%s); survivors will reap it", exc)

    async def _announce(self, channel: str, kind: str, user: str) -> None:
        """Push a join or leave, unless the user is invisible: invisible users join and leave
        every channel silently (on every namespace, not only their own `user:` channel)."""
        if not await self.store.is_invisible(user):
            await self._publish(channel, kind, user)

    def _pushes(self, count: int) -> bool:
        """Push join/leave only when it changed something, and only on channels of at most
        `push_limit` members: on bigger ones every member hearing every join is quadratic
        traffic (1,000 people entering a room = 500,000 pushes); ask `presence` instead."""
        return 0 < count <= self._push_limit

    def _entries(self) -> list[Entry]:
        return [(ch, user) for ch, users in self._local.items() for user in users]

    # --- local sockets ----------------------------------------------------------------

    async def add(self, channel: str, user: str) -> None:
        users = self._local.setdefault(channel, {})
        users[user] = users.get(user, 0) + 1
        if users[user] > 1:
            return
        try:
            if self._pushes(await self._batch(True, (channel, user))):
                await self._announce(channel, "join", user)
        except Exception as exc:
            log.warning("presence join %s %s failed (%s); reconciling later", channel, user, exc)
            self._dirty = True

    async def remove(self, channel: str, user: str) -> None:
        users = self._local.get(channel)
        if users is None or user not in users:
            return
        users[user] -= 1
        if users[user] > 0:
            return
        del users[user]
        if not users:
            del self._local[channel]
        try:
            if self._pushes(await self._batch(False, (channel, user))):
                await self._announce(channel, "leave", user)
        except Exception as exc:
            log.warning("presence leave %s %s failed (%s); reconciling later", channel, user, exc)
            self._dirty = True

    async def set_invisible(self, user: str, invisible: bool) -> None:
        """Switch `user`'s invisibility; the channels they are in (on any node) hear them
        leave (going invisible) or join (becoming visible again), once, as for a real leave
        or join (`push_limit` included). Their own `user:` channel has nobody else to tell."""
        if await self.store.is_invisible(user) == invisible:
            return
        await self.store.set_invisible(user, invisible)
        kind = "leave" if invisible else "join"
        for channel in await self.store.channels_of(user):
            if channel == f"user:{user}":
                continue
            total = (await self.store.members(channel, 0, 1)).total
            if self._pushes(total):
                await self._publish(channel, kind, user)

    async def seems_online(self, user: str) -> bool:
        """Whether others may be told `user` has a connection: they have one (on `user:<id>`),
        or they are invisible, who never seem offline (that would tell they are not
        connected). An alert's WebSocket route says `sent` or `offline` from this."""
        if await self.store.is_invisible(user):
            return True
        return (await self.store.members(f"user:{user}", 0, 1)).total > 0

    async def members(self, channel: str, cursor: int, limit: int) -> Page:
        """Everyone present, invisible users included (the server's own view)."""
        return await self.store.members(channel, cursor, limit)

    async def members_seen_by(self, channel: str, cursor: int, limit: int, viewer: str) -> Page:
        """A page of members as `viewer` may see it: invisible users (other than the viewer)
        are neither listed nor counted."""
        page = await self.store.members(channel, cursor, limit)
        hidden = await self.store.hidden_in(channel) - {viewer}
        if not hidden:
            return page
        shown = [(user, since) for user, since in page.members if user not in hidden]
        return Page(shown, page.cursor, max(0, page.total - len(hidden)))

    # --- liveness ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence heartbeat failed: %s", exc)
                self._dirty = True
            await asyncio.sleep(self._heartbeat_s)

    async def _beat(self) -> None:
        known = await self.store.heartbeat(self.node, self._node_timeout_s)
        instance = await self.store.instance()
        if instance != self._instance:
            # The store restarted empty: put back what our sockets hold. Nobody saw these
            # users leave, so nobody is told they joined.
            self._instance = instance
            await self.store.restore(self.node, self._entries(), _now())
            log.info("presence store restarted; restored %d entries", len(self._entries()))
            self._dirty = False
        elif not known or self._dirty:
            await self._reconcile()
        await self._reap()

    async def _reconcile(self) -> None:
        """Make the store hold exactly our local entries, pushing what really changed."""
        wanted = set(self._entries())
        held = set(await self.store.entries_of(self.node))
        stale, missing = sorted(held - wanted), sorted(wanted - held)
        for (channel, user), left in zip(
            stale, await self.store.leave(self.node, stale), strict=True
        ):
            if self._pushes(left):
                await self._announce(channel, "leave", user)
        for (channel, user), joined in zip(
            missing, await self.store.join(self.node, missing, _now()), strict=True
        ):
            if self._pushes(joined):
                await self._announce(channel, "join", user)
        self._dirty = False

    async def _reap(self) -> None:
        for dead in await self.store.dead_nodes(self.node):
            if not await self.store.claim_reap(self.node, dead, 4 * self._node_timeout_s):
                continue
            entries = await self.store.entries_of(dead)
            left = await self.store.leave(dead, entries)
            for (channel, user), gone in zip(entries, left, strict=True):
                if self._pushes(gone):
                    await self._announce(channel, "leave", user)
            await self.store.forget_node(dead)
            log.warning(
                "node %s stopped heartbeating: removed its %d presence entries", dead, len(entries)
            )


def _now() -> int:
    return int(time.time() * 1000)


__all__ = ["Page", "PresenceTracker"]
