"""The PINs that stop an alarm (docs/protocol.md, "Cancel window, duress PIN"): the user's PIN
and an optional duress PIN. Whatever stops or postpones an alarm once a PIN is set
(`alert.cancel`, `checkin.done`, `checkin.extend`) names one of them: the PIN does what it
says; the duress PIN answers exactly the same but the alarm goes out at once, flagged
`duress` for the people it reaches (alerts.cancel, alerts.checkin).

Records: `pins` key owner -> {"pin": hash, "duress": hash | None, "set": ms}; `pin_attempts`
key owner -> {"recent": [ms of each wrong PIN within the window]}. Hashes are Argon2id
(libsodium through PyNaCl, its "interactive" cost: 64 MiB, 2 passes), computed in a worker
thread, optionally over an HMAC of the PIN with a server-side pepper (a secret that is not in
the store: a stolen store alone then cannot be searched for 4-digit PINs). A PIN is never
logged, never returned, never part of an error message.

Checking a PIN always verifies against both hashes (a stand-in hash when there is no duress
PIN), so the time an answer takes does not tell which one matched.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from typing import Any, Literal

import nacl.exceptions
from nacl.pwhash import argon2id

from realtime_safety.protocol import Feature, ProtocolError, Reply, Session
from realtime_safety.storage import DocStore

from .lane import Lane
from .model import now_ms

PIN_MIN, PIN_MAX = 4, 32
ATTEMPT_WINDOW_MS = 600_000
Match = Literal["pin", "duress"]


def _pin(value: object, name: str) -> str:
    if not isinstance(value, str) or not PIN_MIN <= len(value) <= PIN_MAX:
        raise ProtocolError("bad_request", f"'{name}' must be a string of {PIN_MIN}-{PIN_MAX}")
    return value


class Pins:
    def __init__(
        self, docs: DocStore, *, attempts: int = 5, pepper: bytes = b"", concurrency: int = 1
    ) -> None:
        self._docs = docs
        self._attempts = attempts
        self._pepper = pepper
        # Each hash takes 64 MiB and ~0.15 s of a core: one at a time (the loop needs a core).
        self._slots = asyncio.Semaphore(concurrency)
        self._stand_in: bytes | None = None

    # --- hashing (in a worker thread) ----------------------------------------------------

    def _material(self, pin: str) -> bytes:
        if not self._pepper:
            return pin.encode()
        return hmac.new(self._pepper, pin.encode(), hashlib.sha256).hexdigest().encode()

    async def _hash(self, pin: str) -> str:
        material = self._material(pin)
        async with self._slots:
            hashed = await asyncio.to_thread(
                argon2id.str,
                material,
                opslimit=argon2id.OPSLIMIT_INTERACTIVE,
                memlimit=argon2id.MEMLIMIT_INTERACTIVE,
            )
        return hashed.decode()

    async def _verify(self, hashed: str, pin: str) -> bool:
        material = self._material(pin)

        def verify() -> bool:
            try:
                return bool(argon2id.verify(hashed.encode(), material))
            except nacl.exceptions.InvalidkeyError:
                return False

        async with self._slots:
            return await asyncio.to_thread(verify)

    async def _stand_in_hash(self) -> str:
        if self._stand_in is None:
            self._stand_in = (await self._hash(os.urandom(16).hex())).encode()
        return self._stand_in.decode()

    # --- records -------------------------------------------------------------------------

    async def has_pin(self, owner: str) -> bool:
        return await self._docs.get("pins", owner) is not None

    async def set(self, owner: str, frame: dict[str, Any]) -> Reply:
        """`pin.set {pin, duress_pin?, current_pin?}`: `current_pin` (the PIN, not the duress
        PIN) is needed to replace PINs already set."""
        pin = _pin(frame.get("pin"), "pin")
        duress = frame.get("duress_pin")
        if duress is not None:
            duress = _pin(duress, "duress_pin")
            if duress == pin:
                raise ProtocolError("bad_request", "the duress PIN must differ from the PIN")
        existing = await self._docs.get("pins", owner)
        if existing is not None:
            current = frame.get("current_pin")
            if current is None:
                raise ProtocolError("forbidden", "'current_pin' is needed to change the PIN")
            if await self.check(owner, current) != "pin":
                raise ProtocolError("forbidden", "wrong PIN")
        doc = {
            "pin": await self._hash(pin),
            "duress": None if duress is None else await self._hash(duress),
            "set": now_ms(),
        }
        if existing is None:
            if await self._docs.insert("pins", owner, doc) is not None:
                raise ProtocolError("conflict", "the PIN was set meanwhile; retry")
        elif not await self._docs.put("pins", owner, doc, version=existing["_v"]):
            raise ProtocolError("conflict", "the PIN was changed meanwhile; retry")
        return {"pin": True, "duress_pin": duress is not None}

    async def check(self, owner: str, pin: object) -> Match:
        """Which PIN this is; `forbidden` for a wrong one (counted: more than `attempts`
        within 10 minutes are `rate_limited`), `conflict` when the owner has none."""
        value = _pin(pin, "pin")
        doc = await self._docs.get("pins", owner)
        if doc is None:
            raise ProtocolError("conflict", "no PIN is set (pin.set)")
        tries = await self._docs.get("pin_attempts", owner)
        now = now_ms()
        recent = [t for t in (tries or {}).get("recent", []) if now - t < ATTEMPT_WINDOW_MS]
        if len(recent) >= self._attempts:
            raise ProtocolError(
                "rate_limited",
                "too many wrong PINs",
                retry_after_ms=ATTEMPT_WINDOW_MS - (now - recent[0]),
            )
        duress_hash = doc.get("duress") or await self._stand_in_hash()
        is_pin, is_duress = await asyncio.gather(
            self._verify(doc["pin"], value), self._verify(duress_hash, value)
        )
        if is_pin or (is_duress and doc.get("duress")):
            if tries is not None and tries.get("recent"):
                await self._docs.put("pin_attempts", owner, {"recent": []}, version=tries["_v"])
            return "pin" if is_pin else "duress"
        await self._wrong(owner, tries, [*recent, now])
        raise ProtocolError("forbidden", "wrong PIN")

    async def _wrong(self, owner: str, tries: dict[str, Any] | None, recent: list[int]) -> None:
        """Count a wrong PIN (compare-and-set: concurrent guesses all count)."""
        for _ in range(20):
            if tries is None:
                if await self._docs.insert("pin_attempts", owner, {"recent": recent}) is None:
                    return
            elif await self._docs.put(
                "pin_attempts", owner, {"recent": recent}, version=tries["_v"]
            ):
                return
            tries = await self._docs.get("pin_attempts", owner)
            now = now_ms()
            kept = [t for t in (tries or {}).get("recent", []) if now - t < ATTEMPT_WINDOW_MS]
            recent = [*kept, now]


class PinOps(Feature):
    """`pin.set`: the caller's PIN and duress PIN."""

    def __init__(self, pins: Pins, lane: Lane) -> None:
        self._pins, self._lane = pins, lane
        self.ops = {"pin.set": self.set}

    async def set(self, session: Session, frame: dict[str, Any]) -> Reply:
        return await session.bounded(self._lane.run(self._pins.set(session.identity.user, frame)))
