"""What an E2EE v2 client believes about other people's keys (docs/e2ee/identity.md and
transparency.md): only what verifies. A user key comes from a self-signed statement (or a
rotation the old key signed) that the contact book accepts; a device only with a certificate
under that key and not revoked; every one of them is a log entry proven included under a tree
head the client's `LogMonitor` verified. What the server offers that does not verify is left
out and reported as a security event.

Events (dicts appended to `events`, oldest first): `unknown_device` (a device entry that does
not verify or is not proven in the log), `key_changed` (a user key other than the one the
contact book holds), `fork` (two heads of the log that cannot both be true).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgpack

from realtime_safety.client import ServerError

from .contacts import ContactBook
from .e2ee import CryptoError
from .identity import (
    DeviceCertificate,
    Revocation,
    UserKeyStatement,
    VerifiedDevice,
    verified_devices,
    verify_user_key,
)
from .transparency import (
    ForkDetected,
    LogMonitor,
    SignedTreeHead,
    TransparencyError,
    parse_entry,
)

Request = Callable[..., Awaitable[dict[str, Any]]]
MAX_QUERY_USERS = 100


class DirectoryView:
    def __init__(
        self,
        request: Request,
        contacts: ContactBook,
        events: list[dict[str, Any]],
        log_key: bytes | None = None,
    ) -> None:
        self._request = request
        self.contacts = contacts
        self.events = events
        self.monitor = LogMonitor(log_key) if log_key is not None else None
        self._devices: dict[str, list[VerifiedDevice]] = {}  # user -> verified, unrevoked
        # what a device that does not hold its user's key republishes (`own`)
        self._published: dict[str, tuple[UserKeyStatement, list[DeviceCertificate]]] = {}
        self._ever: dict[tuple[str, str], VerifiedDevice] = {}  # every device that verified
        self._reported: set[tuple[str, str, str]] = set()
        # revocations read in the log itself: a lookup may leave them out, the log may not
        self._revoked: set[tuple[str, str]] = set()

    def _event(self, kind: str, **fields: Any) -> None:
        key = (kind, str(fields.get("user")), str(fields.get("device")))
        if kind != "key_changed" and key in self._reported:
            return  # once per (kind, user, device): the app shows it, not a flood
        self._reported.add(key)
        self.events.append({"kind": kind, **fields})

    async def devices(self, users: Iterable[str], *, refresh: bool = True) -> list[VerifiedDevice]:
        """The verified, unrevoked devices of `users` (asking the server unless cached and not
        `refresh`); a blocked contact (a verified user whose key changed) has none."""
        wanted = list(dict.fromkeys(users))
        missing = wanted if refresh else [u for u in wanted if u not in self._devices]
        for start in range(0, len(missing), MAX_QUERY_USERS):
            await self._query(missing[start : start + MAX_QUERY_USERS])
        return [d for u in wanted for d in self._devices.get(u, [])]

    async def device(self, user: str, device: str) -> VerifiedDevice | None:
        """`user`'s device `device` if it verifies (asking the server once when unknown)."""
        for known in self._devices.get(user, []):
            if known.device == device:
                return known
        await self._query([user])
        return next((d for d in self._devices.get(user, []) if d.device == device), None)

    async def own(
        self, user: str, device: str, ed25519: bytes
    ) -> tuple[UserKeyStatement, DeviceCertificate] | None:
        """A device that does not hold its user's key (linked from a trusted device): the
        user's current key statement and this device's certificate under it, as the log has
        them, if the certificate is of these very keys (`ed25519`)."""
        found = await self.device(user, device)
        if found is None or found.ed25519 != ed25519:
            return None
        statement, certs = self._published[user]
        for cert in reversed(certs):
            if cert.device == device and cert.ed25519 == ed25519:
                return statement, cert
        return None

    def ever(self, user: str, device: str) -> VerifiedDevice | None:
        """A device that verified at some point, revoked since or not (to check what it
        signed while it was valid: membership log entries)."""
        return self._ever.get((user, device))

    async def _query(self, users: list[str]) -> None:
        since = self.monitor.head.size if self.monitor and self.monitor.head else None
        args: dict[str, Any] = {"users": users}
        if since:
            args["since"] = since
        answer = await self._request("keys.query", **args)
        if self.monitor is None:  # trust on first use: the app should pin the log key
            self.monitor = LogMonitor(answer["log_key"])
        try:
            self.monitor.update(answer["sth"], answer.get("consistency") or [])
        except ForkDetected as exc:
            self._event("fork", detail=str(exc))
            raise CryptoError("the key directory's log forked: keys not updated") from exc
        for user in users:
            self._believe(user, answer["users"].get(user, []), answer["sth"])

    def _believe(self, user: str, items: list[dict[str, Any]], sth: bytes) -> None:
        assert self.monitor is not None
        statements: list[UserKeyStatement] = []
        certs: list[DeviceCertificate] = []
        revocations: list[Revocation] = []
        for item in items:
            try:
                entry = self.monitor.check_inclusion(
                    item["entry"], item["index"], item["proof"], sth
                )
                if entry.user != user:
                    raise CryptoError("an entry about someone else")
                wire = msgpack.unpackb(entry.payload, raw=False)
                if entry.kind == "user-key":
                    statement = UserKeyStatement.from_wire(wire)
                    verify_user_key(statement)
                    statements.append(statement)
                elif entry.kind == "device":
                    certs.append(DeviceCertificate.from_wire(wire))
                else:
                    revocations.append(Revocation.from_wire(wire))
            except (CryptoError, TransparencyError, KeyError, TypeError, ValueError) as exc:
                device = item.get("device") if isinstance(item, dict) else None
                self._event("unknown_device", user=user, device=device, detail=str(exc))
        if not statements:
            self._devices[user] = []
            return
        current = statements[-1]
        self._published[user] = (current, certs)
        known = self.contacts.key(user)  # the rotations since the key we hold
        seen = [i for i, s in enumerate(statements) if s.user_pub == known]
        after = statements[seen[-1] + 1 :] if seen else statements
        change = self.contacts.observe(user, current.user_pub, after)
        if change is not None:
            self._event("key_changed", user=user, change=change.kind, blocked=change.blocked)
        if not self.contacts.may_share(user):
            self._devices[user] = []
            return
        good = [
            d
            for d in verified_devices(user, current.user_pub, certs, revocations)
            if (user, d.device) not in self._revoked
        ]
        explained = {d.device for d in good} | {r.device for r in revocations}
        explained |= {d for u, d in self._revoked if u == user}
        for cert in certs:
            if cert.device not in explained:  # neither a device of theirs nor revoked
                self._event("unknown_device", user=user, device=cert.device)
        for device in verified_devices(user, current.user_pub, certs, ()):  # revoked or not
            self._ever[user, device.device] = device
        self._devices[user] = good

    async def _move_to(self, head: bytes) -> None:
        """Make `head` (from the server) the monitor's current head, with the consistency
        proof from the one it holds."""
        assert self.monitor is not None
        ours = self.monitor.head.size if self.monitor.head else 0
        theirs = SignedTreeHead.from_wire(head).size
        proof: list[bytes] = []
        if 0 < ours < theirs:
            proof = (await self._request("keys.consistency", first=ours, second=theirs))["proof"]
        try:
            self.monitor.update(head, proof)
        except ForkDetected as exc:
            self._event("fork", detail=str(exc))
            raise CryptoError("the key directory's log forked") from exc

    async def watch_own(self, user: str, user_pub: bytes) -> None:
        """Read every entry added to the log since the last watch (they must rebuild a
        verified head, so none can be left out; docs/e2ee/transparency.md, "Monitoring"):
        - about `user` (the owner): a key that is not `user_pub` raises `key_changed`
          (someone — the server — announced another key for us), a device of ours that does
          not verify under it `unknown_device`;
        - about anyone: a revocation, so that a lookup that leaves it out cannot get a key
          shared with a revoked device.
        The first watch on a device starts from the log as it is (what came before is trusted
        unseen: the lookups' own revocations cover it)."""
        if self.monitor is None:
            await self._query([user])
        assert self.monitor is not None
        first = await self._request("keys.log", start=0, end=0)
        await self._move_to(first["sth"])
        size = SignedTreeHead.from_wire(first["sth"]).size
        if not self.monitor.scanned:
            self.monitor.start_scan(size, first["frontier"])
            return
        leaves: list[tuple[int, bytes]] = []
        while (start := self.monitor.scanned + len(leaves)) < size:
            page = await self._request("keys.log", start=start, end=min(size, start + 1000))
            leaves += list(enumerate(page["entries"], start))
        mine = self.monitor.own_entries(leaves, user)  # checks the leaves make a verified head
        for _, data in leaves:
            seen = parse_entry(data)
            self._devices.pop(seen.user, None)  # their keys changed: asked again when needed
            if seen.kind == "revoke":
                device = msgpack.unpackb(seen.payload, raw=False).get("device")
                self._revoked.add((seen.user, str(device)))
        for _, entry in mine:
            wire = msgpack.unpackb(entry.payload, raw=False)
            if entry.kind == "user-key" and wire.get("user_pub") != user_pub:
                self._event("key_changed", user=user, change="not ours", blocked=False)
            elif entry.kind == "device":
                try:
                    verified_devices(user, user_pub, [DeviceCertificate.from_wire(wire)])[0]
                except (CryptoError, IndexError):
                    self._event("unknown_device", user=user, device=wire.get("device"))

    async def check_gossip(self, head: bytes) -> None:
        """A tree head someone put inside a message: it must be on our line of the log."""
        if self.monitor is None or self.monitor.head is None:
            return
        try:
            place = self.monitor.compare(head)
            if place in ("same", "older"):
                return
            theirs = SignedTreeHead.from_wire(head)
            ours = self.monitor.head.size
            first, second = sorted((ours, theirs.size))
            if first == 0:
                return
            proof = await self._request("keys.consistency", first=first, second=second)
            self.monitor.reconcile(head, proof["proof"])
        except ForkDetected as exc:
            self._event("fork", detail=str(exc))
        except (TransparencyError, ServerError):
            return  # a stale or unverifiable head (or no proof from the server) proves nothing
