"""The moderation ops (docs/protocol.md, "Moderation"): `report` for members, and the `mod.*`
ops for moderators only: watching streams, deleting, banning, reports and the audit log."""

from __future__ import annotations

import time
import uuid
from typing import Any

from realtime_safety.channels.acl import AccessControl, Action
from realtime_safety.channels.ops import channel_of
from realtime_safety.crypto.directory import KeyDirectory
from realtime_safety.protocol import (
    Feature,
    ProtocolError,
    Reply,
    Session,
    arg_int,
    moderator,
    require_str,
)
from realtime_safety.storage import MessageStore, Report, ReportStore

from .service import Moderation


class ModerationOps(Feature):
    def __init__(
        self,
        moderation: Moderation,
        *,
        acl: AccessControl,
        messages: MessageStore,
        reports: ReportStore,
        keys: KeyDirectory,
    ) -> None:
        self._mod = moderation
        self._acl = acl
        self._messages = messages
        self._reports = reports
        self._keys = keys
        self.ops = {
            "report": self.report,
            "mod.watch": self.watch,
            "mod.unwatch": self.unwatch,
            "mod.delete": self.delete,
            "mod.ban": self.ban,
            "mod.unban": self.unban,
            "mod.reports": self.list_reports,
            "mod.resolve_report": self.resolve_report,
            "mod.audit": self.audit,
        }

    async def ended(self, session: Session) -> None:
        self._mod.forget(session)

    async def report(self, session: Session, frame: dict[str, Any]) -> Reply:
        """A member reports a message; with `franking` the plaintext they reveal is checked to
        be exactly what the sender sent, or the report is refused."""
        ch = channel_of(frame)
        seq = arg_int(frame, "seq", minimum=1)
        if seq is None:
            raise ProtocolError("bad_request", "'seq' is required")
        reason = require_str(frame, "reason", max_len=500)
        await self._acl.check(session.identity, ch, Action.HISTORY)
        found = await session.bounded(self._messages.after(ch.name, seq - 1, 1))
        if not found or found[0].seq != seq:
            raise ProtocolError("not_found", f"no message {seq} in {ch.name}")
        message = found[0]
        text = None
        if frame.get("franking") is not None:
            text = self._keys.verify_report(message, frame["franking"], session.codec)
        report = Report(
            id=uuid.uuid4().hex,
            channel=ch.name,
            seq=seq,
            reporter=session.identity.user,
            sender=message.user,
            reason=reason,
            ts=int(time.time() * 1000),
            text=text,
            verified=text is not None,
        )
        await session.bounded(self._reports.add(report))
        return {"report_id": report.id, "verified": report.verified}

    async def watch(self, session: Session, frame: dict[str, Any]) -> Reply:
        moderator(session)
        patterns = await session.bounded(self._mod.watch(session, frame.get("pattern")))
        return {"patterns": patterns}

    async def unwatch(self, session: Session, frame: dict[str, Any]) -> Reply:
        moderator(session)
        patterns = await session.bounded(self._mod.unwatch(session, frame.get("pattern")))
        return {"patterns": patterns}

    async def delete(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await session.bounded(self._mod.delete(moderator(session), frame))

    async def ban(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await session.bounded(self._mod.ban(moderator(session), frame))

    async def unban(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await session.bounded(self._mod.unban(moderator(session), frame))

    async def list_reports(self, session: Session, frame: dict[str, Any]) -> Reply:
        moderator(session)
        state = frame.get("state", "open")
        if state not in ("open", "actioned", "dismissed"):
            raise ProtocolError("bad_request", "'state' must be open, actioned or dismissed")
        limit = arg_int(frame, "limit", minimum=1, maximum=500) or 100
        reports = await session.bounded(self._reports.list(state, limit))
        return {
            "reports": [
                {
                    "id": r.id,
                    "channel": r.channel,
                    "seq": r.seq,
                    "reporter": r.reporter,
                    "sender": r.sender,
                    "reason": r.reason,
                    "ts": r.ts,
                    "text": r.text,
                    "verified": r.verified,
                    "state": r.state,
                }
                for r in reports
            ]
        }

    async def resolve_report(self, session: Session, frame: dict[str, Any]) -> Reply:
        actor = moderator(session)
        report_id = require_str(frame, "report_id", max_len=64)
        state = frame.get("state")
        if state not in ("actioned", "dismissed"):
            raise ProtocolError("bad_request", "'state' must be actioned or dismissed")
        if not await session.bounded(self._reports.resolve(report_id, state)):
            raise ProtocolError("not_found", "no open report with that id")
        await session.bounded(
            self._mod.audit(actor, "resolve_report", report_id=report_id, state=state)
        )
        return {"report_id": report_id, "state": state}

    async def audit(self, session: Session, frame: dict[str, Any]) -> Reply:
        moderator(session)
        since = arg_int(frame, "since") or 0
        limit = arg_int(frame, "limit", minimum=1, maximum=1000) or 100
        return {"entries": await session.bounded(self._mod.audit_log(since, limit))}
