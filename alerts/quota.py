"""The trigger limit: `alert_quota` key owner -> {"recent": [[ms, alert id], ...]}, the alerts
of the last 10 minutes, counted across the cluster (compare-and-set on the store)."""

from __future__ import annotations

from realtime_safety.protocol import ProtocolError
from realtime_safety.storage import DocStore

from .model import now_ms
from .plan import TRIGGER_WINDOW_MS


class Quota:
    def __init__(self, docs: DocStore, limit: int) -> None:
        self._docs = docs
        self.limit = limit

    async def reserve(self, owner: str, alert_id: str, *, force: bool = False) -> None:
        """Count this trigger against the owner's limit before anything of the alert is
        written. Idempotent per alert id: a retry whose first attempt got this far does not
        count twice. `force`: count, never refuse (an alert the server raises itself)."""
        for _ in range(50):
            doc = await self._docs.get("alert_quota", owner)
            now = now_ms()
            recent = [r for r in (doc or {}).get("recent", []) if now - r[0] < TRIGGER_WINDOW_MS]
            if any(r[1] == alert_id for r in recent):
                return
            if len(recent) >= self.limit and not force:
                raise ProtocolError(
                    "rate_limited",
                    "too many alerts; call emergency services",
                    retry_after_ms=TRIGGER_WINDOW_MS - (now - recent[0][0]),
                )
            new = {"recent": [*recent, [now, alert_id]]}
            if doc is None:
                if await self._docs.insert("alert_quota", owner, new) is None:
                    return
            elif await self._docs.put("alert_quota", owner, new, version=doc["_v"]):
                return
        raise ProtocolError("unavailable", "too many concurrent alerts, retry")

    async def full(self, owner: str) -> int | None:
        """Milliseconds until the owner may trigger again, or None when they may now."""
        doc = await self._docs.get("alert_quota", owner)
        now = now_ms()
        recent = [r for r in (doc or {}).get("recent", []) if now - r[0] < TRIGGER_WINDOW_MS]
        if len(recent) < self.limit:
            return None
        return int(TRIGGER_WINDOW_MS - (now - recent[0][0]))
