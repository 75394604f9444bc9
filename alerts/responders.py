"""Where responders last said they are, for 'nearby' matching; entries expire."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from .model import distance_m


class Responders:
    def __init__(self, redis_url: str | None, ttl_s: float) -> None:
        self._redis: Any = aioredis.from_url(redis_url) if redis_url else None
        self._local: dict[str, tuple[dict[str, Any], float]] = {}
        self._ttl = ttl_s

    async def share(self, user: str, location: dict[str, Any]) -> None:
        expires = time.time() + self._ttl
        if self._redis is None:
            self._local[user] = (location, expires)
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.geoadd("rt:responders:geo", (location["lon"], location["lat"], user))
            pipe.zadd("rt:responders:expiry", {user: expires})
            await pipe.execute()

    async def near(self, location: dict[str, Any], radius_m: float) -> list[str]:
        now = time.time()
        if self._redis is None:
            self._local = {u: v for u, v in self._local.items() if v[1] > now}
            return sorted(
                u for u, (loc, _) in self._local.items() if distance_m(loc, location) <= radius_m
            )
        expired = await self._redis.zrangebyscore("rt:responders:expiry", "-inf", now)
        if expired:
            await self._redis.zrem("rt:responders:geo", *expired)
            await self._redis.zrem("rt:responders:expiry", *expired)
        found = await self._redis.geosearch(
            "rt:responders:geo",
            longitude=location["lon"],
            latitude=location["lat"],
            radius=radius_m,
            unit="m",
        )
        return sorted(u.decode() for u in found)

    async def forget(self, user: str) -> None:
        """`user` is no responder now (the role was dropped): never matched again, whatever
        time their last location had left."""
        if self._redis is None:
            self._local.pop(user, None)
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem("rt:responders:geo", user)
            pipe.zrem("rt:responders:expiry", user)
            await pipe.execute()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
