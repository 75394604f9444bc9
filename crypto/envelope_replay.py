"""The replay guard of E2EE v2 (docs/e2ee/messages.md, "Replays"): a receiver shows each
message once, however often and wherever the server re-delivers it."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from . import envelope_wire as w
from .e2ee import CryptoError

_Where = int | None  # the history seq a message was read at, if the caller said


@dataclass
class _SessionSeen:
    floor: int = 0  # every index below it counts as seen (evicted from `indices`)
    indices: dict[int, _Where] = field(default_factory=dict)


class ReplayGuard:
    """Remembers what was shown: (sender user, device, session, index) and (sender user,
    device, client_msg_id). A second sighting raises CryptoError("replay") -- unless the caller
    passes the same history `seq` both times (the same stored message, read again).

    Bounded: at most `max_sessions` sessions (least recently used forgotten first), per session
    at most `max_per_session` indices (beyond that the lowest are folded into a floor and any
    index below the floor counts as a replay: fail closed), and at most `max_ids`
    client_msg_ids (least recently used forgotten). A forgotten session is only safe to forget
    when its key is deleted too (`InboundSessions.forget_before`); the defaults hold far more
    than the sessions a 24-hour, 100-message rotation leaves live."""

    def __init__(
        self, max_sessions: int = 4096, max_per_session: int = 1024, max_ids: int = 65536
    ) -> None:
        self.max_sessions = max_sessions
        self.max_per_session = max_per_session
        self.max_ids = max_ids
        self._sessions: OrderedDict[tuple[str, str, str], _SessionSeen] = OrderedDict()
        self._ids: OrderedDict[tuple[str, str, str], _Where] = OrderedDict()

    def seen(
        self, user: str, device: str, session_id: str, index: int, client_msg_id: str,
        seq: int | None = None,
    ) -> bool:  # fmt: skip
        """Whether `check` would refuse this message (without recording it)."""
        held = self._sessions.get((user, device, session_id))
        if held is not None:
            if index < held.floor:
                return True
            if index in held.indices and (seq is None or held.indices[index] != seq):
                return True
        key = (user, device, client_msg_id)
        return key in self._ids and (seq is None or self._ids[key] != seq)

    def check(
        self, user: str, device: str, session_id: str, index: int, client_msg_id: str,
        *, seq: int | None = None,
    ) -> None:  # fmt: skip
        """Raise CryptoError("replay") on a second sighting; otherwise remember this one."""
        if self.seen(user, device, session_id, index, client_msg_id, seq):
            raise CryptoError("replay")
        skey = (user, device, session_id)
        held = self._sessions.setdefault(skey, _SessionSeen())
        self._sessions.move_to_end(skey)
        held.indices[index] = seq
        while len(held.indices) > self.max_per_session:
            lowest = min(held.indices)
            del held.indices[lowest]
            held.floor = max(held.floor, lowest + 1)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        self.check_id(user, device, client_msg_id, seq=seq)

    def check_id(
        self, user: str, device: str, client_msg_id: str, *, seq: int | None = None
    ) -> None:
        """The (sender, client_msg_id) half alone (v1 envelopes have no session index)."""
        key = (user, device, client_msg_id)
        if key in self._ids and (seq is None or self._ids[key] != seq):
            raise CryptoError("replay")
        self._ids[key] = seq
        self._ids.move_to_end(key)
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)

    def to_bytes(self) -> bytes:
        sessions = [
            [*k, s.floor, [[i, w] for i, w in s.indices.items()]] for k, s in self._sessions.items()
        ]
        ids = [[*k, w] for k, w in self._ids.items()]
        limits = [self.max_sessions, self.max_per_session, self.max_ids]
        return w.store("replay", [limits, sessions, ids])

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplayGuard:
        try:
            limits, sessions, ids = w.unstore(data, "replay")
            guard = cls(*limits)
            for user, device, sid, floor, indices in sessions:
                guard._sessions[user, device, sid] = _SessionSeen(floor, dict(map(tuple, indices)))
            for user, device, cmid, where in ids:
                guard._ids[user, device, cmid] = where
        except (ValueError, TypeError):
            raise CryptoError("not a replay guard store") from None
        return guard
