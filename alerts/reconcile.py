"""The reconciler on every node: every alert that is due (its `due` index) is claimed by
compare-and-set, so one node at a time: its countdown ended (it goes out), its escalation step
taken if one is due, and whatever of its plan is unfinished queued again — after a crash, a
lost queue or a store timeout, the plan still goes out. Also the trail's retention.

The node that stored a countdown also sets a timer for its end (`at`), so it goes out on time
rather than at the next pass; the passes are the fallback (node killed during the window)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .cancel import moderators_push
from .model import now_ms
from .plan import due, escalation

if TYPE_CHECKING:
    from .service import AlertService

log = logging.getLogger("realtime.alerts")


class Reconciler:
    def __init__(self, service: AlertService) -> None:
        self._svc = service
        self._timers: set[asyncio.TimerHandle] = set()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._ticker(), name="alert-reconcile"),
            asyncio.create_task(self._janitor(), name="alert-trail-retention"),
        ]

    async def _ticker(self) -> None:
        settings = self._svc.settings
        pause = min(1.0, settings.reconcile_s / 2, settings.escalate_s / 4)
        while True:
            try:
                await self.reconcile_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("alerts: reconcile pass failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(pause)

    def at(self, when_ms: int, alert_id: str) -> None:
        """Look at the alert at `when_ms` (its countdown's end) on this node."""
        self.later(when_ms, lambda: self.visit(alert_id), "countdown")

    def later(self, when_ms: int, work: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run `work()` at `when_ms` on this node (in the background; cancelled on stop)."""
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            self._svc.background(work(), name)

        handle = loop.call_later(max(0.0, (when_ms - now_ms()) / 1000), fire)
        self._timers.add(handle)

    def cancel_timers(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    async def visit(self, alert_id: str) -> None:
        """The alert, if it is due."""
        doc = await self._svc.docs.get("alerts", alert_id)
        if doc is not None and doc.get("due") is not None and doc["due"] <= now_ms():
            await self._visit(alert_id, doc)

    async def reconcile_due(self) -> None:
        """One pass over every alert that is due."""
        for alert_id, doc in await self._svc.docs.below("alerts", now_ms(), 50):
            await self._visit(alert_id, doc)

    async def _visit(self, alert_id: str, doc: dict[str, Any]) -> None:
        svc = self._svc
        reconcile_s = svc.settings.reconcile_s
        claimed = dict(doc)
        activating = doc["state"] == "countdown"
        if activating:
            if doc["notify_at"] > now_ms():
                return
            claimed["state"] = "active"
        escalating = (
            claimed["state"] == "active"
            and not doc["acked_by"]
            and doc.get("next_escalation") is not None
            and doc["next_escalation"] <= now_ms()
        )
        if escalating:
            contacts = await svc.contacts(doc["owner"])
            claimed.update(escalation(doc, contacts, svc.settings.escalate_s))
        claimed["due"] = due(claimed, reconcile_s)
        if not await svc.docs.put(
            "alerts", alert_id, claimed, ix=claimed["due"], version=doc["_v"]
        ):
            return  # another node has it
        claimed["_v"] = doc["_v"] + 1
        if activating:
            svc.checkpoint("countdown:ended")
        if escalating:
            svc.checkpoint("escalate:stored")
            log.info("alerts: escalated an alert (step %d)", claimed["escalations"])
        done = await svc.materialize(claimed)
        if activating:
            await svc.announce("@moderators", moderators_push(claimed))
        if not done:
            return  # due again after reconcile_s
        planned = len(claimed.get("jobs", []))

        def settle(fresh: dict[str, Any]) -> None:
            if len(fresh.get("jobs", [])) == planned:  # nothing new was planned meanwhile
                fresh["due"] = due(fresh, None)

        await svc.update(alert_id, settle)

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(60)
            cutoff = now_ms() - int(self._svc.settings.trail_days * 86_400_000)
            try:
                await self._svc.docs.delete_below("alert_trail", cutoff)
            except Exception as exc:
                log.warning("alerts: trail retention failed: %s", exc)
