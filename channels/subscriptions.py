"""One session's channel subscriptions: what the hub delivers to, in `seq` order, each once.

While `subscribe` replays history, live messages for that channel wait in the subscription's
`pending` list (bounded by the session's queue size); right after the subscribe reply the
replay is pushed, then the pending messages newer than the replay. From then on a live
message goes straight out unless it is not newer than the last one pushed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from realtime_safety.protocol import CLOSE_POLICY, Frame, Session

from .hub import message_frame
from .service import Replay


@dataclass(slots=True)
class Subscription:
    last_seq: int = 0
    # While the subscribe command replays history, live pushes wait here (bounded).
    pending: list[tuple[int, Frame]] | None = field(default_factory=list)


class Subscriptions:
    """The hub's subscriber for one session (`channels.hub.Subscriber`)."""

    __slots__ = ("_max_pending", "by_channel", "session", "user")

    def __init__(self, session: Session, max_pending: int) -> None:
        self.session = session
        self.user = session.identity.user  # fixed for the session (refresh keeps the user)
        self.by_channel: dict[str, Subscription] = {}
        self._max_pending = max_pending

    def __len__(self) -> int:
        return len(self.by_channel)

    def __contains__(self, channel: str) -> bool:
        return channel in self.by_channel

    def deliver(self, channel: str, seq: int, frame: Frame) -> None:
        sub = self.by_channel.get(channel)
        if sub is None:
            return
        if sub.pending is not None:
            if len(sub.pending) >= self._max_pending:
                self.session.close(CLOSE_POLICY, "slow consumer: too far behind")
                return
            sub.pending.append((seq, frame))
            return
        if seq <= sub.last_seq:
            return
        sub.last_seq = seq
        self.session.push(frame)

    def deliver_event(self, channel: str, frame: Frame) -> None:
        if channel in self.by_channel:
            self.session.push(frame)

    def replayed(self, channel: str, sub: Subscription, replay: Replay) -> None:
        """After a subscribe reply: the replay, then live pushes held back meanwhile."""
        if self.by_channel.get(channel) is not sub:
            return  # unsubscribed (or kicked) in between
        push = self.session.push
        for m in replay.messages:
            push(message_frame(m))
        sub.last_seq = replay.last_seq
        pending, sub.pending = sub.pending or [], None
        for seq, frame in pending:
            if seq > sub.last_seq:
                sub.last_seq = seq
                push(frame)
