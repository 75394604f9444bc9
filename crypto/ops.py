"""The key directory's ops (docs/protocol.md, "End-to-end encryption"): keys.register,
keys.lookup, keys.share and keys.fetch. The server stores public keys and sealed boxes only;
it never holds a key that opens a message."""

from __future__ import annotations

import time
from typing import Any

from realtime_safety.channels.acl import AccessControl, Action
from realtime_safety.channels.ops import channel_of
from realtime_safety.protocol import (
    Feature,
    Identity,
    ProtocolError,
    Reply,
    Session,
    arg_str,
    require_str,
)
from realtime_safety.storage import KeyStore

from .directory import KeyDirectory


class KeyOps(Feature):
    def __init__(self, directory: KeyDirectory, keys: KeyStore, acl: AccessControl) -> None:
        self._dir = directory
        self._keys = keys
        self._acl = acl
        self.ops = {
            "keys.register": self.register,
            "keys.lookup": self.lookup,
            "keys.share": self.share,
            "keys.fetch": self.fetch,
        }

    async def register(self, session: Session, frame: dict[str, Any]) -> Reply:
        user = session.identity.user
        device = await session.bounded(self._dir.register(user, frame, session.codec))
        return {"device": device.device}

    async def lookup(self, session: Session, frame: dict[str, Any]) -> Reply:
        devices = await session.bounded(self._dir.lookup(frame.get("users")))
        return {
            "devices": [
                {
                    "user": d.user,
                    "device": d.device,
                    "identity_key": d.identity_key,
                    "signing_key": d.signing_key,
                }
                for d in devices
            ]
        }

    async def share(self, session: Session, frame: dict[str, Any]) -> Reply:
        """Hand a channel key to member devices (sealed boxes); every recipient device must
        belong to a user entitled to the channel."""
        ch = channel_of(frame)
        key_id = require_str(frame, "key_id", max_len=64)
        sealed = self._dir.sealed_map(frame.get("sealed"), session.codec)
        await self._acl.check(session.identity, ch, Action.PUBLISH)
        for user, device_id in sealed:
            device = await session.bounded(self._dir.device(user, device_id))
            if device is None:
                raise ProtocolError("not_found", f"{user!r} has no device {device_id!r} registered")
        for user in {user for user, _ in sealed}:
            owner = Identity(user=user, roles=frozenset({"user"}), expires_at=0)
            try:
                await self._acl.check(owner, ch, Action.HISTORY)
            except ProtocolError as err:
                if err.code != "forbidden":
                    raise
                raise ProtocolError(
                    "forbidden", f"{user!r} may not read {ch.name}: no key for their devices"
                ) from None
        conflicts = await session.bounded(
            self._keys.share(
                ch.name, key_id, sealed, session.identity.device, int(time.time() * 1000)
            )
        )
        return {
            "channel": ch.name,
            "key_id": key_id,
            "conflicts": [{"user": u, "device": d} for u, d in conflicts],
        }

    async def fetch(self, session: Session, frame: dict[str, Any]) -> Reply:
        ch = channel_of(frame)
        key_id = arg_str(frame, "key_id", max_len=64, required=False)
        who = session.identity
        device_id = arg_str(frame, "device", max_len=64, required=False) or who.device
        if device_id is None:
            raise ProtocolError("bad_request", "'device' is required (or a token device claim)")
        await self._acl.check(who, ch, Action.HISTORY)
        device = await session.bounded(self._dir.device(who.user, device_id))
        if device is None:
            raise ProtocolError("forbidden", f"you have no device {device_id!r} registered")
        found = await session.bounded(self._keys.fetch(ch.name, who.user, device_id, key_id))
        if found is None:
            raise ProtocolError("not_found", "no key shared with this device for that channel")
        return {"channel": ch.name, "key_id": found[0], "sealed": found[1]}
