"""A connection's command rate: a token bucket, and a client that ignores its refusals is
flooding."""

from __future__ import annotations

import time

from realtime_safety.protocol import ProtocolError


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def _fill(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def ready(self) -> bool:
        """Whether `take` would allow a command now (and so at any later time, until taken)."""
        return self._fill() >= 1

    def take(self) -> float:
        """0 if allowed, else seconds until a token is available."""
        if self._fill() >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class CommandRate:
    """A connection's commands: over the rate, `rate_limited`; more than `burst` refusals
    within 10 s (a client that ignores `retry_after_ms`) is flooding."""

    def __init__(self, rate: float, burst: int) -> None:
        self.bucket = TokenBucket(rate, burst)
        self._burst = burst
        self._rejected = 0
        self._rejected_since = 0.0
        self.flooding = False

    def refuse(self) -> ProtocolError | None:
        """None: the command may run (its token is taken). Otherwise the `rate_limited` error
        to answer, and `flooding` says whether this refusal was one too many."""
        wait = self.bucket.take()
        if not wait:
            return None
        now = time.monotonic()
        if now - self._rejected_since > 10.0:
            self._rejected_since, self._rejected = now, 0
        self._rejected += 1
        self.flooding = self._rejected > self._burst
        return ProtocolError(
            "rate_limited", "too many commands", retry_after_ms=int(wait * 1000) + 1
        )
