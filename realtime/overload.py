"""Overload control: a node refuses chat work early instead of queueing it for seconds, so the
SOS path never waits behind chat (issue 21).

The load signal, sampled every `interval_s` by one task per node:
- **event-loop lag**: how late a timer fires (every await on any path waits about that long);
- **send-queue depth**: frames waiting behind full sockets, across the node's connections;
- **backend calls in flight**: store and broker calls made for commands and not yet answered;
- **backend latency**: how long those calls take (a moving average, or a quarter of the age
  of the oldest one still waiting if that is longer): a shared store that falls behind (chat
  writes from every node) slows the alert writes too, so chat is refused before it does.

From it the node keeps a *shed fraction*: the share of sheddable commands (those features
declare: publish, typing, history, members, presence) it refuses with `unavailable` and a
`retry_after_ms`, cheaply, before any work. While the lag or the backend latency is over its
limit the fraction grows
by a tenth per sample (times how far over the lag limit it is, up to five: a flood that
starts at once is refused within a few samples, not after half a second of queueing); while
under, it falls back to zero over `cool_s`, so the node settles
where it accepts what it can deliver in time instead of flapping between all and nothing. A
queue or backend count over its limit refuses every sheddable command at once. Alert ops,
moderation, auth, subscribe and the alert workers are never refused: they are what the
capacity is kept for.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("realtime.overload")


@dataclass(frozen=True, slots=True)
class OverloadLimits:
    lag_s: float = 0.025  # event-loop lag: every await on the SOS path may wait this long
    queued_frames: int = 200_000  # frames behind full sockets, node-wide (a memory guard)
    backend_calls: int = 2_000  # store/broker calls in flight for commands
    backend_latency_s: float = 0.05  # their moving average (or a quarter of the oldest one's age)
    interval_s: float = 0.05
    cool_s: float = 1.0  # from refusing all to refusing none, once the load is gone


class LoadMonitor:
    def __init__(
        self,
        limits: OverloadLimits,
        queued_frames: Callable[[], int],
        backend_calls: Callable[[], int],
        backend_latency: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._queued = queued_frames
        self._calls = backend_calls
        self._latency = backend_latency
        self._clock = clock
        self.lag_s = 0.0
        self.fraction = 0.0  # of sheddable commands refused now
        self.reason = ""
        self.shed = 0  # commands refused since start (a counter for /metrics)
        self._random = random.random
        self._task: asyncio.Task[None] | None = None

    @property
    def overloaded(self) -> bool:
        return self.fraction > 0

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
        was = self.overloaded
        if self._queued() > limits.queued_frames:
            self.fraction, self.reason = 1.0, "send queues"
        elif self._calls() > limits.backend_calls:
            self.fraction, self.reason = 1.0, "backend calls"
        elif lag_s > limits.lag_s:
            step = 0.1 * min(5.0, lag_s / limits.lag_s)  # far over the limit: faster
            self.fraction, self.reason = min(1.0, self.fraction + step), "event-loop lag"
        elif self._latency() > limits.backend_latency_s:
            self.fraction, self.reason = min(1.0, self.fraction + 0.1), "backend latency"
        else:
            self.fraction -= limits.interval_s / limits.cool_s
            if self.fraction < 1e-9:
                self.fraction = 0.0
                self.reason = ""
        if self.overloaded != was:
            if was:
                log.warning("load back to normal: accepting chat work")
            else:
                log.warning("overloaded (%s): refusing chat work", self.reason)

    def refuse(self) -> bool:
        """Whether to refuse one sheddable command now (counted when refused)."""
        fraction = self.fraction
        if fraction <= 0 or (fraction < 1 and self._random() >= fraction):
            return False
        self.shed += 1
        return True

    def retry_after_ms(self) -> int:
        """What a refused client is told to wait: long enough for the fraction to fall."""
        return int((self.limits.cool_s * self.fraction + self.lag_s) * 1000) + 1
