"""End-to-end encryption that holds against the server (E2EE v2, docs/e2ee/): the client.

    account = DeviceAccount.generate()                  # this device (save()/load())
    me = UserKeys.generate("alice")                     # the user key: first device, or
                                                        # UserKeys.restore(backup, passphrase)
    async with SecureClient(urls, token, "alice", account, me, log_key=LOG_KEY) as chat:
        await chat.create_room("room:team"); await chat.add_member("room:team", "bob")
        await chat.send("room:team", "hello")           # Megolm, signed, franked
        async for message in chat.messages():           # text, or `error`; `verified`
            print(message.user, message.text or message.error)
        chat.events                                     # security events to show the user

Recipients come from the room's signed membership log, keys from directory entries that
verify and are proven in the key log (`DirectoryView`); Megolm session keys travel over Olm in
shares the sending device signs; a removal or a revoked device means a new session. What does
not verify comes back with `error`; what points at an attack goes to `events`
(`unknown_device`, `key_changed`, `member_not_in_signed_log`, `replay`, `fork`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack

from realtime_safety.client import Client, ServerError
from realtime_safety.protocol import SUBPROTOCOL_MSGPACK

from . import device_link
from .client import Decrypted, listed_members
from .client import SecureClient as V1Client
from .contacts import ContactBook, safety_number
from .directory_view import DirectoryView
from .e2ee import CryptoError, DeviceKeys
from .envelope import (
    DeviceAccount,
    InboundSessions,
    KeyShare,
    Olm,
    OutboundSession,
    ReplayGuard,
    classify,
    decrypt_v2,
    encrypt_v2,
    make_share,
    open_share,
)
from .identity import DeviceCertificate, Revocation, VerifiedDevice
from .membership import MembershipError
from .membership_state import MembershipState, diff
from .rooms import Rooms
from .user_keys import UserKeys

ONE_TIME_KEYS = 20
PLAINTEXT_PREFIXES = ("public:",)  # the server's default plaintext namespaces


def _now() -> int:
    return int(time.time() * 1000)


class SecureClient:
    def __init__(
        self,
        urls: list[str] | str,
        token: str | Callable[[], str],
        user: str,
        account: DeviceAccount,
        user_keys: UserKeys | None,
        *,
        log_key: bytes | None = None,
        certificate: DeviceCertificate | None = None,
        on_unverified_change: str = "block",
        legacy: DeviceKeys | None = None,
        **client_options: Any,
    ) -> None:
        """`certificate`: this device's, as saved after an earlier start (`self.certificate`);
        without it the user key certifies the device now (a device is certified once: the
        server refuses a second certificate for the same id under the same user key).
        `legacy`: this device's v1 keys, to read v1 envelopes (never `verified`).
        `on_unverified_change`: what a reset of a contact's user key does when the contact was
        not verified — "block" (the default: nothing to or from the new key until the app
        confirms, `contacts.confirm`) or "accept" (an event only). A rotation signed by the
        old key is always accepted; a verified contact's reset always blocks."""
        self.client = Client(urls, token, fmt=SUBPROTOCOL_MSGPACK, **client_options)
        self.user = user
        self.account = account
        self.user_keys = user_keys
        self.certificate = certificate
        self._v1 = None if legacy is None else V1Client([], "", user, legacy, client=self.client)
        self.events: list[dict[str, Any]] = []
        self.contacts = ContactBook(on_unverified_change=on_unverified_change)  # type: ignore[arg-type]
        self.directory = DirectoryView(self.client.request, self.contacts, self.events, log_key)
        self.olm = Olm(account)
        self.inbound = InboundSessions()
        self.replays = ReplayGuard()
        self._outbound: dict[str, OutboundSession] = {}
        self._shared: dict[str, set[tuple[str, str]]] = {}  # channel -> devices holding it
        self.rooms = Rooms(self.client.request, self.directory, account, user, account.device)
        self._read: dict[tuple[str, str, str, str], set[int]] = {}  # indices read, per session

    @property
    def device(self) -> str:
        return self.account.device

    async def __aenter__(self) -> SecureClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def start(self) -> None:
        """Connect, publish this device (certified by the user key) and its one-time keys,
        and take the key shares waiting for it."""
        await self.client.connect()
        if self.user_keys is None:  # linked from a trusted device (crypto.device_link)
            found = await self.directory.own(self.user, self.device, self.account.ed25519)
            if found is None:
                raise CryptoError("this device is not certified yet: approve it on a trusted one")
            statement, self.certificate = found
        else:
            statement = self.user_keys.announce(_now())
            if self.certificate is None:
                self.certificate = self.user_keys.certify_account(
                    self.account.olm_account, self.device, _now()
                )
        keys = self.account.new_one_time_keys(ONE_TIME_KEYS)
        await self.client.request(
            "keys.publish",
            user_key=statement.to_wire(),
            device=self.certificate.to_wire(),
            one_time_keys=keys,
        )
        self.account.mark_published()
        if self._v1 is not None:
            await self.client.request("keys.register", **self._v1.keys.registration(self.user))
        await self.client.subscribe(f"user:{self.user}")
        await self.check_own_keys()
        await self._take_shares()

    async def check_own_keys(self) -> None:
        """Read the key log's new entries (`send` does, before it shares anything; call it
        now and then): a key or device published for us that we did not make raises
        `key_changed` / `unknown_device` in `events`; revocations are remembered."""
        mine = self.user_keys.public if self.user_keys else self.contacts.key(self.user)
        if mine is not None:
            await self.directory.watch_own(self.user, mine)

    async def subscribe(self, channel: str, since_seq: int | None = None) -> dict[str, Any]:
        return await self.client.subscribe(channel, since_seq)

    def safety_number(self, user: str) -> str | None:
        """The number to compare with `user` in person (None before their key is known)."""
        theirs = self.contacts.key(user)
        if theirs is None:
            return None
        mine = self.user_keys.public if self.user_keys else self.contacts.key(self.user)
        return None if mine is None else safety_number(self.user, mine, user, theirs)

    # --- membership ---------------------------------------------------------------------

    async def room(self, channel: str) -> MembershipState:
        """The room's membership as its signed log says (fetched up to the newest entry)."""
        return await self.rooms.read(channel)

    async def create_room(self, channel: str) -> None:
        await self.rooms.sign(channel, "create", self.user, "owner")

    async def add_member(self, channel: str, user: str, role: str = "member") -> None:
        if not (await self.room(channel)).epoch:
            await self.create_room(channel)
        await self.rooms.sign(channel, "add", user, role)

    async def remove_member(self, channel: str, user: str) -> None:
        await self.rooms.sign(channel, "remove", user, "")
        self._outbound.pop(channel, None)

    async def leave(self, channel: str) -> None:
        await self.rooms.sign(channel, "leave", self.user, "")

    async def revoke_device(self, device: str) -> None:
        """Withdraw one of this user's devices: it gets no further keys; rooms re-key."""
        if self.user_keys is not None:
            revocation = self.user_keys.revoke(device, _now())
        elif device == self.device:
            revocation = Revocation.by_own_device(
                self.account.olm_account, self.user, device, _now()
            )
        else:
            raise CryptoError("only a device holding the user key revokes another device")
        await self.client.request("keys.revoke", revocation=revocation.to_wire())
        self._outbound.clear()

    async def approve_device(self, answer_code: bytes) -> DeviceCertificate:
        """Certify a new device of this user from the code it shows (`device_link.answer`,
        after it scanned `device_link.offer(user_keys)` on this one) and publish it; the new
        device then starts with `user_keys=None` and finds its certificate in the log."""
        if self.user_keys is None:
            raise CryptoError("this device does not hold the user key")
        cert = device_link.approve(self.user_keys, answer_code, _now())
        await self.client.request(
            "keys.publish",
            user_key=self.user_keys.announce(_now()).to_wire(),
            device=cert.to_wire(),
        )
        return cert

    # --- sending ------------------------------------------------------------------------

    async def send(
        self, channel: str, text: str, *, client_msg_id: str | None = None
    ) -> dict[str, Any]:
        """Encrypt for the members the signed log names, sign and publish."""
        await self.check_own_keys()  # and the log's revocations, before anything is shared
        state = await self.room(channel)
        if self.user not in state.members:
            raise CryptoError("not a member of this room by its signed log")
        await self._compare_members(channel, state)
        # (cached until the log has a new entry about them: check_own_keys reads every one)
        devices = await self.directory.devices(sorted(state.members), refresh=False)
        # a device that holds the session and no longer verifies (revoked): a new session
        gone = self._shared.get(channel, set()) - {(d.user, d.device) for d in devices}
        outbound = self._outbound.get(channel)
        if outbound is None or gone or outbound.needs_rotation(_now(), state.rotation_epoch):
            outbound = OutboundSession.new(channel, state.rotation_epoch)
            self._outbound[channel] = outbound
            self._shared[channel] = set()
            self.inbound.add(self._own_share(outbound), now_ms=_now())
        await self._share(channel, outbound, devices)
        cmid = client_msg_id or uuid.uuid4().hex
        body = encrypt_v2(
            self.account, outbound, channel, self.user, cmid, text,
            sth=self.directory.monitor.gossip() if self.directory.monitor else None,
            epoch=state.rotation_epoch,
        )  # fmt: skip
        return await self.client.publish(channel, body, client_msg_id=cmid)

    def _own_share(self, outbound: OutboundSession) -> KeyShare:
        me = (self.user, self.device)
        return KeyShare(
            outbound.channel, outbound.session_id, outbound.message_index, outbound.session_key,
            *me, *me, outbound.epoch, _now(),
        )  # fmt: skip

    async def _compare_members(self, channel: str, state: MembershipState) -> None:
        extra, _missing = diff(state, await listed_members(self.client.request, channel))
        for user in sorted(extra):
            self.events.append(
                {"kind": "member_not_in_signed_log", "channel": channel, "user": user}
            )

    async def _share(
        self, channel: str, outbound: OutboundSession, devices: list[VerifiedDevice]
    ) -> None:
        shared = self._shared.setdefault(channel, set())
        me = (self.user, self.device)
        todo = [d for d in devices if (d.user, d.device) not in shared and (d.user, d.device) != me]
        if not todo:
            return
        need = [d for d in todo if not self.olm.has_session(d.user, d.device, d.curve25519)]
        if need:
            claimed = await self.client.request(
                "keys.claim", devices=[{"user": d.user, "device": d.device} for d in need]
            )
            for key in claimed["keys"]:
                match = next(d for d in need if (d.user, d.device) == (key["user"], key["device"]))
                self.olm.start(match.user, match.device, match.curve25519, key["key"])
        messages = []
        for d in todo:
            if not self.olm.has_session(d.user, d.device, d.curve25519):
                continue  # no one-time key left: it gets the next session
            plain = make_share(self.account, outbound, self.user, d.user, d.device)
            kind, ct = self.olm.encrypt(d.user, d.device, d.curve25519, plain)
            messages.append({"user": d.user, "device": d.device, "type": kind, "ct": ct})
        for start in range(0, len(messages), 100):
            await self.client.request(
                "todevice.send", device=self.device, messages=messages[start : start + 100]
            )
        shared.update((str(m["user"]), str(m["device"])) for m in messages)

    # --- receiving ----------------------------------------------------------------------

    async def _take_shares(self) -> None:
        """Open the key shares waiting for this device (and acknowledge them). A server that
        hands out the same messages again after they were acknowledged is not followed."""
        taken: set[str] = set()
        while True:
            try:
                found = await self.client.request("todevice.fetch", device=self.device)
            except ServerError as exc:
                if exc.code == "forbidden":  # this device was revoked: it gets nothing more
                    return
                raise
            if not found["messages"] or {m["id"] for m in found["messages"]} <= taken:
                return
            taken.update(m["id"] for m in found["messages"])
            for message in found["messages"]:
                await self._open_share(message)
            ids = [m["id"] for m in found["messages"]]
            await self.client.request("todevice.ack", device=self.device, ids=ids)

    async def _open_share(self, message: dict[str, Any]) -> None:
        sender = message["from"]
        device = await self.directory.device(sender["user"], sender["device"])
        if device is None:
            return  # reported by the directory view; nothing from it is believed
        try:
            plain = self.olm.decrypt(
                device.user, device.device, device.curve25519, message["type"], message["ct"]
            )
            channel = msgpack.unpackb(msgpack.unpackb(plain.plaintext)["statement"])[1]
            state = await self.room(channel)  # the share's epoch may be newer than ours

            def is_member(ch: str, user: str, dev: str, epoch: int) -> bool:
                return ch == channel and user in state.members and epoch <= state.epoch

            share = open_share(
                plain,
                self.user,
                self.device,
                device.ed25519,
                device.curve25519,
                is_member=is_member,
            )
            self.inbound.add(share, now_ms=_now())
        except (CryptoError, KeyError, TypeError, ValueError, IndexError, ServerError):
            return  # a share that does not verify gives no key

    async def open(self, push: dict[str, Any]) -> Decrypted:
        """Decrypt one message push (or history item); never raises for a bad message."""
        body, sender, channel = push["body"], push["from"], push["channel"]
        base = {"channel": channel, "seq": push["seq"], "user": sender["user"],
                "device": None, "client_msg_id": push["client_msg_id"]}  # fmt: skip
        try:
            encrypted = not channel.startswith(PLAINTEXT_PREFIXES)
            kind = classify(body, encrypted, v1_allowed=self._v1 is not None)
        except CryptoError as exc:
            return Decrypted(**base, text=None, error=exc.reason)
        if kind == "plain":
            return Decrypted(**base, text=body.get("text"))
        if kind == "v1" and self._v1 is not None:  # its keys came from the server: unverified
            old = await self._v1.open(push)
            return Decrypted(**{**base, "device": old.device}, text=old.text, error=old.error)
        base["device"] = body.get("device")
        try:
            device = await self.directory.device(sender["user"], str(body.get("device")))
        except (CryptoError, ServerError):  # a forked directory (reported) or no answer
            device = None
        if device is None:
            return Decrypted(**base, text=None, error="sender device does not verify")
        ref = (channel, sender["user"], device.device, body.get("session"))
        if ref not in self.inbound:
            await self._take_shares()
        try:
            opened = decrypt_v2(
                body, channel, sender["user"], push["client_msg_id"], device.ed25519,
                self.inbound, self.replays, seq=push["seq"],
            )  # fmt: skip
        except CryptoError as exc:
            reason = exc.reason
            if reason != "bad signature" and self._seen_before(body, sender["user"], push):
                reason = "replay"  # read already: its key is gone, the guard still knows it
            if reason == "replay":
                self.events.append({"kind": "replay", "channel": channel, "user": sender["user"]})
            return Decrypted(**base, text=None, error=reason)
        self._forget_read(ref, body["index"])
        if opened.sth is not None:
            await self.directory.check_gossip(opened.sth)
        return Decrypted(**base, text=opened.text, franking_key=opened.franking_key, verified=True)

    def _seen_before(self, body: dict[str, Any], user: str, push: dict[str, Any]) -> bool:
        try:
            return self.replays.seen(
                user, body["device"], body["session"], body["index"], push["client_msg_id"],
                push["seq"],
            )  # fmt: skip
        except (KeyError, TypeError):
            return False

    def _forget_read(self, ref: tuple[str, str, str, str], index: int) -> None:
        """Forward secrecy on this device (docs/e2ee/messages.md): once a message is read,
        the session is kept only from the first index not read yet, so whoever steals the
        device's state later opens nothing it has read (history is not re-readable here:
        the app keeps the plaintext it wants)."""
        read = self._read.setdefault(ref, set())
        read.add(index)
        session = self.inbound.get(ref)
        if session is None:
            return
        first = session.first_known_index
        while first in read:
            read.discard(first)
            first += 1
        read.difference_update({i for i in read if i < first})
        try:
            self.inbound.ratchet_to(ref, first)
        except CryptoError:
            return

    async def messages(self) -> AsyncIterator[Decrypted]:
        """Every message of the subscribed channels, decrypted or marked with `error`."""
        async for push in self.client.pushes():
            message = await self.handle(push)
            if message is not None:
                yield message

    async def handle(self, push: dict[str, Any]) -> Decrypted | None:
        """Process one push: messages are opened; key shares taken; a membership change
        refreshes the room (a removal starts a new session before the next message)."""
        kind = push.get("push")
        if kind == "message":
            return await self.open(push)
        if kind == "todevice" and push.get("device") == self.device:
            await self._take_shares()
        elif kind in ("members.log", "rekey"):
            known = self.rooms.known(push["channel"])
            if known is not None:
                fresh = await self.rooms.read(push["channel"])
                if fresh.rotation_epoch != known.rotation_epoch:
                    self._outbound.pop(push["channel"], None)
        return None

    async def report(self, message: Decrypted, reason: str) -> dict[str, Any]:
        """Report a message to moderators, proving its plaintext with the franking opening."""
        args: dict[str, Any] = {"channel": message.channel, "seq": message.seq, "reason": reason}
        if message.text is not None and message.franking_key is not None:
            args["franking"] = {"text": message.text, "key": message.franking_key}
        return await self.client.request("report", **args)


__all__ = ["Decrypted", "MembershipError", "SecureClient"]
