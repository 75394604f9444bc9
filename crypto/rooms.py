"""A client's view of its rooms' signed membership logs (docs/e2ee/membership.md): read up to
the newest entry and verified with device keys from the directory view, never taken from the
server's word; and the entries this device signs (create, add, remove, leave)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from realtime_safety.client import ServerError

from .directory_view import DirectoryView
from .e2ee import CryptoError
from .membership import DeviceSigner, MemberEntry
from .membership_state import MembershipState, sign_next

Request = Callable[..., Awaitable[dict[str, Any]]]


class Rooms:
    def __init__(
        self, request: Request, directory: DirectoryView, signer: DeviceSigner, user: str,
        device: str,
    ) -> None:  # fmt: skip
        self._request = request
        self._directory = directory
        self._signer = signer
        self._user, self._device = user, device
        self._states: dict[str, MembershipState] = {}

    def known(self, channel: str) -> MembershipState | None:
        """The state last read, without asking the server."""
        return self._states.get(channel)

    async def read(self, channel: str) -> MembershipState:
        """The room's membership as its signed log says, fetched up to the newest entry."""
        state = self._states.get(channel) or MembershipState(channel)
        answer = await self._request("members.log.fetch", channel=channel, after=state.epoch)
        entries = [MemberEntry.from_wire(e) for e in answer["entries"]]
        await self._directory.devices({e.actor_user for e in entries}, refresh=False)
        new = state.copy()
        for entry in entries:
            new.apply(entry, self._device_key)
        self._states[channel] = new
        return new

    def _device_key(self, user: str, device: str) -> bytes | None:
        # a device valid when it signed, revoked since or not (the server checked it was
        # valid when the entry was appended; the log keeps its order)
        found = self._directory.ever(user, device)
        return found.ed25519 if found else None

    async def sign(self, channel: str, op: str, target: str, role: str) -> MembershipState:
        """Append this device's entry `op` on `target` (checked against the rules first);
        another entry that lands first is read and the entry signed again on top of it."""
        for _ in range(3):
            state = await self.read(channel)
            entry = sign_next(
                state, self._signer, op=op, target_user=target, role=role,
                actor_user=self._user, actor_device=self._device,
                ts_ms=int(time.time() * 1000),
            )  # fmt: skip
            try:
                await self._request("members.log.append", channel=channel, entry=entry.to_wire())
            except ServerError as exc:
                if exc.code == "conflict":
                    continue
                raise
            return await self.read(channel)
        raise CryptoError("the membership log kept moving: try again")
