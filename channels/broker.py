"""Brokers move opaque frames between nodes: in-process (one node) or Redis pub/sub (many).

A node subscribes to a broker topic once, however many local sockets watch it (the `Hub`
counts references). `subscribe` returns only once the subscription is active, so a reader of
the store after it cannot miss a message published in between. After a Redis outage the broker
re-subscribes by itself and calls `on_resync`, and the hub repairs any gap from the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("realtime.broker")

Handler = Callable[[str, bytes], None]
Resync = Callable[[], None]


class BrokerUnavailable(Exception):
    """The broker could not be reached."""


class Broker:
    """The interface both brokers implement."""

    async def start(self, handler: Handler, on_resync: Resync) -> None:
        raise NotImplementedError

    async def subscribe(self, topic: str) -> None:
        raise NotImplementedError

    async def unsubscribe(self, topic: str) -> None:
        raise NotImplementedError

    async def publish(self, topic: str, data: bytes) -> None:
        raise NotImplementedError

    async def ping(self) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class InProcessBroker(Broker):
    """The single-node broker: delivery is a direct call, in publish order."""

    def __init__(self) -> None:
        self._handler: Handler | None = None
        self._topics: set[str] = set()

    async def start(self, handler: Handler, on_resync: Resync) -> None:
        self._handler = handler

    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        if self._handler is not None and topic in self._topics:
            self._handler(topic, data)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._handler = None


class RedisBroker(Broker):
    """Redis pub/sub: one PubSub connection per node, read by one owned task."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self._redis = aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=15,
        )
        self._pubsub = self._redis.pubsub()
        self._timeout = timeout_s
        self._handler: Handler | None = None
        self._on_resync: Resync = lambda: None
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._recovering = False

    async def start(self, handler: Handler, on_resync: Resync) -> None:
        self._handler = handler
        self._on_resync = on_resync
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc
        self._reader = asyncio.create_task(self._read(), name="redis-pubsub-reader")

    async def _read(self) -> None:
        backoff = 0.05
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if not self._recovering:
                    log.warning("redis pub/sub connection lost (%s); reconnecting", exc)
                self._recovering = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            except Exception:
                log.exception("redis pub/sub reader failed; continuing")
                await asyncio.sleep(backoff)
                continue
            backoff = 0.05
            if msg is None:
                continue
            kind = msg["type"]
            topic = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
            if kind == "message" and self._handler is not None:
                try:
                    self._handler(topic, msg["data"])
                except Exception:
                    log.exception("handler failed for a message on %s", topic)
            elif kind == "subscribe":
                for fut in self._waiting.pop(topic, []):
                    if not fut.done():
                        fut.set_result(None)
                if self._recovering:
                    self._recovering = False
                    log.info("redis pub/sub re-subscribed; repairing gaps from the store")
                    self._on_resync()

    async def subscribe(self, topic: str) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(topic, []).append(fut)
        try:
            async with asyncio.timeout(self._timeout):
                await self._pubsub.subscribe(topic)
                await fut
        except (RedisError, OSError, TimeoutError) as exc:
            waiters = self._waiting.get(topic, [])
            if fut in waiters:
                waiters.remove(fut)
            raise BrokerUnavailable(f"redis subscribe failed: {exc!r}") from exc

    async def unsubscribe(self, topic: str) -> None:
        try:
            await self._pubsub.unsubscribe(topic)
        except (RedisError, OSError) as exc:
            # The topic is gone from our own bookkeeping; Redis forgets it on reconnect.
            log.warning("redis unsubscribe %s failed: %s", topic, exc)

    async def publish(self, topic: str, data: bytes) -> None:
        try:
            await self._redis.publish(topic, data)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis publish failed: {exc}") from exc

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        try:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            await self._redis.aclose()
        except (RedisError, OSError):
            pass
