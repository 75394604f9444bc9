"""Overload control: a node refuses chat work early instead of queueing it for seconds, so the
SOS path never waits behind chat (issue 21).

The load signal, sampled every `interval_s` by one task per node:
- **event-loop lag**: how late a timer fires (everything on the node waits that long);
- **send-queue depth**: frames waiting behind full sockets, across the node's connections;
- **backend calls in flight**: store and broker calls made for commands and not yet answered.

Over any of its limits the node is *overloaded*: the ops that features declare sheddable
(chat: publish, subscribe, history, typing, ...) are refused with `unavailable` and a
`retry_after_ms`, cheaply, before any work. Alert ops, moderation, auth and the alert workers
never are: they are what the capacity is kept for. The node leaves the state once every signal
has been under half its limit for `cool_s` (hysteresis: no flapping at the edge).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("realtime.overload")


@dataclass(frozen=True, slots=True)
class OverloadLimits:
    lag_s: float = 0.1  # event-loop lag
    queued_frames: int = 50_000  # frames behind full sockets, node-wide
    backend_calls: int = 2_000  # store/broker calls in flight for commands
    interval_s: float = 0.05
    cool_s: float = 1.0


class LoadMonitor:
    def __init__(
        self,
        limits: OverloadLimits,
        queued_frames: Callable[[], int],
        backend_calls: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._queued = queued_frames
        self._calls = backend_calls
        self._clock = clock
        self.lag_s = 0.0
        self.overloaded = False
        self.reason = ""
        self.shed = 0  # commands refused since start (a counter for /metrics)
        self._calm_since: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="overload-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        interval = self.limits.interval_s
        while True:
            before = self._clock()
            await asyncio.sleep(interval)
            self.sample(max(0.0, self._clock() - before - interval))

    def sample(self, lag_s: float) -> None:
        """One reading of the signals (`lag_s`: how late the last timer fired)."""
        limits = self.limits
        self.lag_s = lag_s
        readings = (
            ("event-loop lag", lag_s, limits.lag_s),
            ("send queues", self._queued(), limits.queued_frames),
            ("backend calls", self._calls(), limits.backend_calls),
        )
        over = next((name for name, value, limit in readings if value > limit), None)
        now = self._clock()
        if over is not None:
            self._calm_since = None
            if not self.overloaded:
                log.warning("overloaded (%s): refusing chat work", over)
            self.overloaded, self.reason = True, over
            return
        if not self.overloaded:
            return
        if any(value > limit / 2 for _, value, limit in readings):
            self._calm_since = None
            return
        if self._calm_since is None:
            self._calm_since = now
        elif now - self._calm_since >= limits.cool_s:
            self.overloaded, self.reason, self._calm_since = False, "", None
            log.warning("load back to normal: accepting chat work")

    def retry_after_ms(self) -> int:
        """What a refused client is told to wait: the cool-down, spread a little by the lag."""
        return int((self.limits.cool_s + self.lag_s) * 1000)
