"""The reconciler on every node: every alert that is due (its `due` index) is claimed by
compare-and-set, so one node at a time, its escalation step taken if one is due, and
whatever of its plan is unfinished queued again — after a crash, a lost queue or a store
timeout, the plan still goes out. Also the trail's retention."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .model import now_ms
from .plan import due, escalation

if TYPE_CHECKING:
    from .service import AlertService

log = logging.getLogger("realtime.alerts")


class Reconciler:
    def __init__(self, service: AlertService) -> None:
        self._svc = service

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

    async def reconcile_due(self) -> None:
        """One pass over every alert that is due."""
        for alert_id, doc in await self._svc.docs.below("alerts", now_ms(), 50):
            await self._visit(alert_id, doc)

    async def _visit(self, alert_id: str, doc: dict[str, Any]) -> None:
        svc = self._svc
        reconcile_s = svc.settings.reconcile_s
        claimed = dict(doc)
        escalating = (
            doc["state"] == "active"
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
        if escalating:
            svc.checkpoint("escalate:stored")
            log.info("alerts: escalated an alert (step %d)", claimed["escalations"])
        if not await svc.materialize(claimed):
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
