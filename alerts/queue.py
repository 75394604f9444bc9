"""The delivery queues, one per route (ws, push, sms), so that a route whose provider hangs or
throttles never holds up the others. Each job is one (alert, recipient, route, purpose).

The queue is derived state: the durable plan is the alert's own record (its `jobs` list) and the
per-recipient `deliveries` records (`alerts.service`). A reconciler re-puts any planned job
that is not finished, so a queue that lost its jobs (Redis restarted without persistence, a
stream deleted) is rebuilt from the store; `put` is idempotent on the job key, so re-putting a
live job is a no-op.

- `StoreJobQueue` (embedded topology): jobs are documents in the local store, keyed by their
  idempotency key; a worker claims a job by compare-and-set on a lease, so a crashed worker's
  jobs come back when the lease expires.
- `RedisJobQueue` (Redis deployments): a Redis Stream with a consumer group per route; jobs a
  crashed worker held are reclaimed with XAUTOCLAIM after the lease; delayed retries wait in a
  sorted set until due. Enqueueing is one script (the key's marker and the entry together), and
  a consumer group lost with Redis's data is recreated on the next read.

Both say how far behind they are (`backlog`, for /metrics) and whether they can take jobs at
all (`ping`, for /readyz).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from realtime_safety.storage import DocStore


@dataclass
class Job:
    key: str  # the idempotency key: one job per (alert, recipient, route, purpose)
    data: dict[str, Any]
    attempts: int = 0
    handle: Any = field(default=None, repr=False)  # the queue's own reference
    since: int = 0  # ms: when the job was first enqueued (kept across retries)


@dataclass(frozen=True)
class Backlog:
    """How far a queue is behind (ms; 0 when it is empty): `lag`, how long the oldest job that
    is due has waited for a worker to finish it; `oldest`, how long ago the oldest job still
    in the queue (due or waiting for its retry) was first enqueued; `jobs`, how many were
    looked at (at most SCAN)."""

    lag_ms: int
    oldest_ms: int
    jobs: int


SCAN = 500  # jobs looked at per backlog measurement


class JobQueue(Protocol):
    async def put(self, key: str, data: dict[str, Any], due_ms: int = 0) -> bool:
        """Enqueue unless a job with this key was already enqueued; True if enqueued."""
        ...

    async def take(self, consumer: str, n: int, lease_s: float) -> list[Job]:
        """Up to n due jobs, leased to `consumer` for `lease_s`."""
        ...

    async def done(self, job: Job) -> None: ...

    async def retry(self, job: Job, due_ms: int, *, count: bool = True) -> None:
        """Give the job back, due later, with one more attempt counted (unless `count` is
        False: a job that waited for something else, not one that failed)."""
        ...

    async def ping(self) -> bool:
        """Whether jobs can be put and taken now."""
        ...

    async def backlog(self) -> Backlog: ...

    async def close(self) -> None: ...


def _backlog(now: int, due: list[int], since: list[int], jobs: int) -> Backlog:
    ready = [d for d in due if d <= now]
    return Backlog(now - min(ready) if ready else 0, now - min(since) if since else 0, jobs)


def _now() -> int:
    return int(time.time() * 1000)


class StoreJobQueue:
    def __init__(self, docs: DocStore, route: str) -> None:
        self._docs = docs
        self._coll = f"jobs:{route}"

    async def put(self, key: str, data: dict[str, Any], due_ms: int = 0) -> bool:
        now = _now()
        due = max(due_ms, now)  # the index orders jobs by when they are due
        doc = {"data": data, "attempts": 0, "since": now, "due": due}
        return await self._docs.insert(self._coll, key, doc, ix=due) is None

    async def take(self, consumer: str, n: int, lease_s: float) -> list[Job]:
        now = _now()
        jobs = []
        for key, doc in await self._docs.below(self._coll, now + 1, n):
            if doc.get("done"):
                continue
            lease = now + int(lease_s * 1000)
            if await self._docs.put(
                self._coll, key, {**doc, "owner": consumer}, ix=lease, version=doc["_v"]
            ):
                jobs.append(
                    Job(
                        key,
                        doc["data"],
                        doc["attempts"],
                        handle=doc["_v"] + 1,
                        since=doc.get("since", now),
                    )
                )
        return jobs

    async def done(self, job: Job) -> None:
        # Kept (never due again) so that the same key cannot be enqueued twice.
        await self._docs.put(
            self._coll, job.key, {"data": job.data, "attempts": job.attempts, "done": True}, ix=None
        )

    async def retry(self, job: Job, due_ms: int, *, count: bool = True) -> None:
        attempts = job.attempts + (1 if count else 0)
        doc = {"data": job.data, "attempts": attempts, "since": job.since, "due": due_ms}
        await self._docs.put(self._coll, job.key, doc, ix=due_ms)

    async def ping(self) -> bool:
        return True  # the store itself is checked by the node's readiness

    async def backlog(self) -> Backlog:
        now = _now()
        # Every job not done has an index: when it is due, or (taken) when its lease ends.
        found = [doc for _, doc in await self._docs.below(self._coll, 2**62, SCAN)]
        return _backlog(
            now,
            [doc.get("due", now) for doc in found],
            [doc["since"] for doc in found if "since" in doc],
            len(found),
        )

    async def close(self) -> None:
        return None


_PUT = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 0 end
if tonumber(ARGV[3]) > tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
else
  redis.call('XADD', KEYS[2], '*', 'j', ARGV[2])
end
return 1
"""

_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, item in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'j', item)
  redis.call('ZREM', KEYS[1], item)
end
return #due
"""


class RedisJobQueue:
    GROUP = "workers"

    def __init__(self, url: str, route: str, *, dedupe_ttl_s: int = 7 * 86400) -> None:
        self._redis: Any = aioredis.from_url(url)
        # One hash tag per route: the script's keys share a slot on Redis Cluster.
        self._tag = "{rt:alerts:" + route + "}"
        self.stream = f"{self._tag}:jobs"
        self.delayed = f"{self._tag}:delayed"
        self._put = self._redis.register_script(_PUT)
        self._move = self._redis.register_script(_MOVE_DUE)
        self._dedupe_ttl = dedupe_ttl_s
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self.stream, self.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    @staticmethod
    def _pack(key: str, data: dict[str, Any], attempts: int, since: int) -> bytes:
        packed: bytes = msgpack.packb(
            {"k": key, "d": data, "a": attempts, "s": since, "n": uuid.uuid4().hex},
            use_bin_type=True,
        )
        return packed

    async def put(self, key: str, data: dict[str, Any], due_ms: int = 0) -> bool:
        await self._ensure_group()
        now = _now()
        added = await self._put(
            keys=[f"{self._tag}:job:{key}", self.stream, self.delayed],
            args=[self._dedupe_ttl, self._pack(key, data, 0, now), due_ms, now],
        )
        return bool(added)

    async def take(self, consumer: str, n: int, lease_s: float) -> list[Job]:
        try:
            return await self._take(consumer, n, lease_s)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost its data (a restart without persistence): the group is gone with the
            # stream. Recreate it; the reconciler re-puts what the store still plans.
            self._group_ready = False
            return await self._take(consumer, n, lease_s)

    async def _take(self, consumer: str, n: int, lease_s: float) -> list[Job]:
        await self._ensure_group()
        await self._move(keys=[self.delayed, self.stream], args=[_now()])
        entries: list[tuple[Any, dict[Any, Any]]] = []
        # Jobs of a worker that died (leased too long ago) first.
        _, claimed, *_ = await self._redis.xautoclaim(
            self.stream, self.GROUP, consumer, min_idle_time=int(lease_s * 1000), count=n
        )
        entries += claimed
        if len(entries) < n:
            read = await self._redis.xreadgroup(
                self.GROUP, consumer, {self.stream: ">"}, count=n - len(entries), block=100
            )
            for _, items in read or []:
                entries += items
        jobs = []
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted meanwhile
            item = msgpack.unpackb(fields[b"j"], raw=False)
            since = item.get("s", _entry_ms(entry_id))
            jobs.append(Job(item["k"], item["d"], item["a"], handle=entry_id, since=since))
        return jobs

    async def done(self, job: Job) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.GROUP, job.handle)
            pipe.xdel(self.stream, job.handle)
            await pipe.execute()

    async def retry(self, job: Job, due_ms: int, *, count: bool = True) -> None:
        attempts = job.attempts + (1 if count else 0)
        async with self._redis.pipeline(transaction=True) as pipe:
            packed = self._pack(job.key, job.data, attempts, job.since)
            pipe.zadd(self.delayed, {packed: due_ms})
            pipe.xack(self.stream, self.GROUP, job.handle)
            pipe.xdel(self.stream, job.handle)
            await pipe.execute()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(2):
                return bool(await self._redis.ping())
        except Exception:
            return False

    async def backlog(self) -> Backlog:
        """The stream holds the jobs that are due and not done (taken ones included, each
        entry's id being when it became due); the sorted set those waiting for a retry (their
        score the time they are due: one past it counts as lag until a worker moves it)."""
        now = _now()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xrange(self.stream, count=SCAN)
            pipe.zrange(self.delayed, 0, SCAN - 1, withscores=True)
            entries, delayed = await pipe.execute()
        due = [_entry_ms(entry_id) for entry_id, _ in entries]
        due += [int(score) for _, score in delayed]
        since = []
        for entry_id, fields in entries:
            item = msgpack.unpackb(fields[b"j"], raw=False) if fields else {}
            since.append(item.get("s", _entry_ms(entry_id)))
        since += [msgpack.unpackb(packed, raw=False).get("s", now) for packed, _ in delayed]
        return _backlog(now, due, since, len(entries) + len(delayed))

    async def close(self) -> None:
        await self._redis.aclose()


def _entry_ms(entry_id: Any) -> int:
    """A stream entry id's time part (ms): when the entry was added."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(raw.split("-", 1)[0])
