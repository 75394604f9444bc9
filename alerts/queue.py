"""The durable delivery queue: each (alert, recipient, route, purpose) is one job.

- `StoreJobQueue` (embedded topology): jobs are documents in the local store, keyed by their
  idempotency key; a worker claims a job by compare-and-set on a lease, so a crashed worker's
  jobs come back when the lease expires.
- `RedisJobQueue` (Redis deployments): a Redis Stream with a consumer group; jobs a crashed
  worker held are reclaimed with XAUTOCLAIM after the lease; delayed retries wait in a sorted
  set until due. Enqueueing is idempotent on the job key (SET NX).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from storage import DocStore


@dataclass
class Job:
    key: str  # the idempotency key: one job per (alert, recipient, route, purpose)
    data: dict[str, Any]
    attempts: int = 0
    handle: Any = field(default=None, repr=False)  # the queue's own reference


class JobQueue(Protocol):
    async def put(self, key: str, data: dict[str, Any], due_ms: int = 0) -> bool:
        """Enqueue unless a job with this key was already enqueued; True if enqueued."""
        ...

    async def take(self, consumer: str, n: int, lease_s: float) -> list[Job]:
        """Up to n due jobs, leased to `consumer` for `lease_s`."""
        ...

    async def done(self, job: Job) -> None: ...

    async def retry(self, job: Job, due_ms: int) -> None:
        """Give the job back, due later, with one more attempt counted."""
        ...

    async def close(self) -> None: ...


def _now() -> int:
    return int(time.time() * 1000)


class StoreJobQueue:
    COLL = "jobs"

    def __init__(self, docs: DocStore) -> None:
        self._docs = docs

    async def put(self, key: str, data: dict[str, Any], due_ms: int = 0) -> bool:
        doc = {"data": data, "attempts": 0}
        return await self._docs.insert(self.COLL, key, doc, ix=due_ms) is None

    async def take(self, consumer: str, n: int, lease_s: float) -> list[Job]:
        now = _now()
        jobs = []
        for key, doc in await self._docs.below(self.COLL, now + 1, n):
            if doc.get("done"):
                continue
            lease = now + int(lease_s * 1000)
            if await self._docs.put(
                self.COLL, key, {**doc, "owner": consumer}, ix=lease, version=doc["_v"]
            ):
                jobs.append(Job(key, doc["data"], doc["attempts"], handle=doc["_v"] + 1))
        return jobs

    async def done(self, job: Job) -> None:
        # Kept (never due again) so that the same key cannot be enqueued twice.
        await self._docs.put(
            self.COLL, job.key, {"data": job.data, "attempts": job.attempts, "done": True}, ix=None
        )

    async def retry(self, job: Job, due_ms: int) -> None:
        await self._docs.put(
            self.COLL, job.key, {"data": job.data, "attempts": job.attempts + 1}, ix=due_ms
        )

    async def close(self) -> None:
        return None


_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, item in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'j', item)
  redis.call('ZREM', KEYS[1], item)
end
return #due
"""


class RedisJobQueue:
    STREAM = "rt:alerts:jobs"
    DELAYED = "rt:alerts:delayed"
    GROUP = "workers"

    def __init__(self, url: str, *, dedupe_ttl_s: int = 7 * 86400) -> None:
        self._redis: Any = aioredis.from_url(url)
        self._move = self._redis.register_script(_MOVE_DUE)
        self._dedupe_ttl = dedupe_ttl_s
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self.STREAM, self.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    @staticmethod
    def _pack(key: str, data: dict[str, Any], attempts: int) -> bytes:
        packed: bytes = msgpack.packb(
            {"k": key, "d": data, "a": attempts, "n": uuid.uuid4().hex}, use_bin_type=True
        )
        return packed

    async def put(self, key: str, data: dict[str, Any], due_ms: int = 0) -> bool:
        await self._ensure_group()
        if not await self._redis.set(f"rt:alerts:job:{key}", 1, nx=True, ex=self._dedupe_ttl):
            return False
        item = self._pack(key, data, 0)
        if due_ms > _now():
            await self._redis.zadd(self.DELAYED, {item: due_ms})
        else:
            await self._redis.xadd(self.STREAM, {"j": item})
        return True

    async def take(self, consumer: str, n: int, lease_s: float) -> list[Job]:
        await self._ensure_group()
        await self._move(keys=[self.DELAYED, self.STREAM], args=[_now()])
        entries: list[tuple[Any, dict[Any, Any]]] = []
        # Jobs of a worker that died (leased too long ago) first.
        _, claimed, *_ = await self._redis.xautoclaim(
            self.STREAM, self.GROUP, consumer, min_idle_time=int(lease_s * 1000), count=n
        )
        entries += claimed
        if len(entries) < n:
            read = await self._redis.xreadgroup(
                self.GROUP, consumer, {self.STREAM: ">"}, count=n - len(entries), block=100
            )
            for _, items in read or []:
                entries += items
        jobs = []
        for entry_id, fields in entries:
            if not fields:
                continue  # deleted meanwhile
            item = msgpack.unpackb(fields[b"j"], raw=False)
            jobs.append(Job(item["k"], item["d"], item["a"], handle=entry_id))
        return jobs

    async def done(self, job: Job) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.STREAM, self.GROUP, job.handle)
            pipe.xdel(self.STREAM, job.handle)
            await pipe.execute()

    async def retry(self, job: Job, due_ms: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self.DELAYED, {self._pack(job.key, job.data, job.attempts + 1): due_ms})
            pipe.xack(self.STREAM, self.GROUP, job.handle)
            pipe.xdel(self.STREAM, job.handle)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()
