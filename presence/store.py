"""Where presence lives: in-process (embedded topology) or in Redis (shared by all nodes).

Presence is user level: a user is a member of a channel while at least one of their
connections, on any node, is subscribed. Each node reports (channel, user) once, when its first
local connection of that user subscribes, and withdraws it when its last one goes; the store
answers whether that made the user join or leave cluster-wide. Those answers are atomic, so
exactly one node sees "joined" and exactly one sees "left".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis

Entry = tuple[str, str]  # (channel, user)


@dataclass(frozen=True, slots=True)
class Page:
    members: list[tuple[str, int]]  # (user, since ms)
    cursor: int  # 0 when this is the last page
    total: int


class PresenceStore(Protocol):
    async def join(self, node: str, entries: list[Entry], now_ms: int) -> list[int]:
        """Record that `node` holds these (channel, user) entries. For each: 0 if the user was
        already present, else the channel's member count now (the user joined)."""
        ...

    async def leave(self, node: str, entries: list[Entry]) -> list[int]:
        """Withdraw entries of `node`. For each: 0 if the user is still present elsewhere,
        else the number of members left + 1 (the user left)."""
        ...

    async def restore(self, node: str, entries: list[Entry], now_ms: int) -> None:
        """Re-record entries after the store lost them (no join is reported)."""
        ...

    async def members(self, channel: str, cursor: int, limit: int) -> Page: ...

    async def heartbeat(self, node: str, ttl_s: float) -> bool:
        """Mark `node` alive; False if the store had forgotten it (restarted, expired, or
        reaped by a survivor)."""
        ...

    async def instance(self) -> str:
        """Changes when the store restarts and so loses everything (Redis run_id)."""
        ...

    async def dead_nodes(self, me: str) -> list[str]:
        """Nodes that hold entries but stopped heartbeating."""
        ...

    async def claim_reap(self, me: str, dead: str, ttl_s: float) -> bool:
        """One survivor wins the right to clear a dead node's entries."""
        ...

    async def entries_of(self, node: str) -> list[Entry]: ...

    async def forget_node(self, node: str) -> None: ...

    async def set_invisible(self, user: str, invisible: bool) -> None: ...

    async def is_invisible(self, user: str) -> bool: ...

    async def hidden_in(self, channel: str) -> set[str]:
        """The invisible users among a channel's members."""
        ...

    async def channels_of(self, user: str) -> list[str]:
        """The channels `user` is present in, on any node."""
        ...

    async def close(self) -> None: ...


class MemoryPresence:
    """The embedded topology: one node, nothing to share, nothing to reap."""

    def __init__(self) -> None:
        self._members: dict[str, dict[str, int]] = {}
        self._invisible: set[str] = set()

    async def join(self, node: str, entries: list[Entry], now_ms: int) -> list[int]:
        out = []
        for channel, user in entries:
            members = self._members.setdefault(channel, {})
            joined = user not in members
            members.setdefault(user, now_ms)
            out.append(len(members) if joined else 0)
        return out

    async def leave(self, node: str, entries: list[Entry]) -> list[int]:
        out = []
        for channel, user in entries:
            members = self._members.get(channel, {})
            left = members.pop(user, None) is not None
            out.append(len(members) + 1 if left else 0)
            if not members:
                self._members.pop(channel, None)
        return out

    async def restore(self, node: str, entries: list[Entry], now_ms: int) -> None:
        await self.join(node, entries, now_ms)

    async def members(self, channel: str, cursor: int, limit: int) -> Page:
        everyone = sorted(self._members.get(channel, {}).items())
        page = everyone[cursor : cursor + limit]
        nxt = cursor + limit if cursor + limit < len(everyone) else 0
        return Page(page, nxt, len(everyone))

    async def heartbeat(self, node: str, ttl_s: float) -> bool:
        return True

    async def instance(self) -> str:
        return "memory"

    async def dead_nodes(self, me: str) -> list[str]:
        return []

    async def claim_reap(self, me: str, dead: str, ttl_s: float) -> bool:
        return False

    async def entries_of(self, node: str) -> list[Entry]:
        return []

    async def forget_node(self, node: str) -> None:
        return None

    async def set_invisible(self, user: str, invisible: bool) -> None:
        if invisible:
            self._invisible.add(user)
        else:
            self._invisible.discard(user)

    async def is_invisible(self, user: str) -> bool:
        return user in self._invisible

    async def hidden_in(self, channel: str) -> set[str]:
        return self._invisible & self._members.get(channel, {}).keys()

    async def channels_of(self, user: str) -> list[str]:
        return sorted(ch for ch, members in self._members.items() if user in members)

    async def close(self) -> None:
        return None


# KEYS (one channel, one hash slot): members hash (user -> since), counts hash (user -> nodes
# holding the user), holders set ("user|node"). ARGV: user, node, now.
_JOIN = """
if redis.call('SADD', KEYS[3], ARGV[1] .. '|' .. ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[1], 1) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return redis.call('HLEN', KEYS[1])
end
return 0
"""
_LEAVE = """
if redis.call('SREM', KEYS[3], ARGV[1] .. '|' .. ARGV[2]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], ARGV[1])
  return redis.call('HLEN', KEYS[1]) + 1
end
return 0
"""
NODES = "rt:pres:nodes"  # hash node -> last heartbeat (ms)
INVISIBLE = "rt:pres:invisible"


def _keys(channel: str) -> list[str]:
    tag = f"rt:pres:{{{channel}}}"  # one hash slot per channel on Redis Cluster
    return [f"{tag}:m", f"{tag}:c", f"{tag}:h"]


def _index(node: str) -> str:
    """The set of "channel|user" entries a node holds, so survivors can clear them."""
    return f"rt:pres:node:{{{node}}}:entries"


class RedisPresence:
    """Presence in Redis. Each join or leave is one atomic script on one channel's keys;
    all entries of one call go in one pipeline: one round trip, whatever the channel's size."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, node_timeout_s: float = 15.0) -> None:
        self._redis: Any = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._join = self._redis.register_script(_JOIN)
        self._leave = self._redis.register_script(_LEAVE)
        self._node_timeout_ms = int(node_timeout_s * 1000)

    async def _run(
        self, script: Any, node: str, entries: list[Entry], now_ms: int, *, joining: bool
    ) -> list[int]:
        """The node's index is written before a join and cleared after a leave, so a crash
        in between leaves at worst an index entry whose leave is a no-op, never a member
        that nobody can clear."""
        if not entries:
            return []
        index = _index(node)
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, user in entries:
                if joining:
                    pipe.sadd(index, f"{channel}|{user}")
                await script(keys=_keys(channel), args=[user, node, now_ms], client=pipe)
                if not joining:
                    pipe.srem(index, f"{channel}|{user}")
            results = await pipe.execute()
        offset = 1 if joining else 0
        return [int(results[2 * i + offset]) for i in range(len(entries))]

    async def join(self, node: str, entries: list[Entry], now_ms: int) -> list[int]:
        return await self._run(self._join, node, entries, now_ms, joining=True)

    async def leave(self, node: str, entries: list[Entry]) -> list[int]:
        return await self._run(self._leave, node, entries, 0, joining=False)

    async def restore(self, node: str, entries: list[Entry], now_ms: int) -> None:
        await self._run(self._join, node, entries, now_ms, joining=True)

    async def members(self, channel: str, cursor: int, limit: int) -> Page:
        key = _keys(channel)[0]
        nxt, raw = await self._redis.hscan(key, cursor=cursor, count=limit)
        total = await self._redis.hlen(key)
        members = sorted((u.decode(), int(since)) for u, since in raw.items())
        return Page(members, int(nxt), int(total))

    async def heartbeat(self, node: str, ttl_s: float) -> bool:
        now = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(f"rt:pres:alive:{{{node}}}", now, ex=max(1, int(ttl_s)), get=True)
            pipe.hset(NODES, node, now)
            previous, added = await pipe.execute()
        # Forgotten if our key expired (silent too long) or if a survivor took us off the
        # node list (it reaped us, maybe before our key expired: survivors judge by the time
        # written here, the key's TTL runs from when Redis got it).
        return previous is not None and not added

    async def instance(self) -> str:
        info = await self._redis.info("server")
        return str(info.get("run_id", ""))

    async def dead_nodes(self, me: str) -> list[str]:
        now = int(time.time() * 1000)
        seen = await self._redis.hgetall(NODES)
        return [
            n.decode()
            for n, ts in seen.items()
            if n.decode() != me and now - int(ts) > self._node_timeout_ms
        ]

    async def claim_reap(self, me: str, dead: str, ttl_s: float) -> bool:
        claimed = await self._redis.set(
            f"rt:pres:reap:{{{dead}}}", me, nx=True, ex=max(1, int(ttl_s))
        )
        return bool(claimed)

    async def entries_of(self, node: str) -> list[Entry]:
        out = []
        for item in await self._redis.smembers(_index(node)):
            channel, _, user = item.decode().rpartition("|")
            out.append((channel, user))
        return out

    async def forget_node(self, node: str) -> None:
        await self._redis.hdel(NODES, node)
        await self._redis.delete(_index(node))

    async def set_invisible(self, user: str, invisible: bool) -> None:
        if invisible:
            await self._redis.sadd(INVISIBLE, user)
        else:
            await self._redis.srem(INVISIBLE, user)

    async def is_invisible(self, user: str) -> bool:
        return bool(await self._redis.sismember(INVISIBLE, user))

    async def hidden_in(self, channel: str) -> set[str]:
        """Two round trips; the second reads the smaller of the invisible users and the
        channel's members (and is skipped when either is empty)."""
        key = _keys(channel)[0]
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.scard(INVISIBLE)
            pipe.hlen(key)
            invisible_count, member_count = await pipe.execute()
        if not invisible_count or not member_count:
            return set()
        if invisible_count <= member_count:
            invisible = [u.decode() for u in await self._redis.smembers(INVISIBLE)]
            present = await self._redis.hmget(key, invisible)
            return {u for u, since in zip(invisible, present, strict=True) if since is not None}
        members = [u.decode() for u in await self._redis.hkeys(key)]
        flags = await self._redis.smismember(INVISIBLE, members)
        return {u for u, flag in zip(members, flags, strict=True) if flag}

    async def channels_of(self, user: str) -> list[str]:
        """Every node's index, filtered by Redis (`*|user`: a user id has no `|` and no glob
        character): a scan of all entries, for the rare invisibility switch only."""
        found: set[str] = set()
        for node in await self._redis.hkeys(NODES):
            index = _index(node.decode())
            async for item in self._redis.sscan_iter(index, match=f"*|{user}", count=1000):
                found.add(item.decode().rpartition("|")[0])
        return sorted(found)

    async def close(self) -> None:
        await self._redis.aclose()
