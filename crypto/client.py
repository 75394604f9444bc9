"""Encryption without touching a nonce: the end-to-end encrypted client for apps.

    keys = DeviceKeys.generate()                        # a random device id; save() and
                                                        # DeviceKeys.load(file, passphrase)
    async with SecureClient(urls, token, "alice", keys) as chat:
        await chat.subscribe("room:team")
        await chat.send("room:team", "hello")            # encrypted, franked, signed
        async for message in chat.messages():            # decrypted, or marked undecryptable
            print(message.user, message.text or message.error)

It registers the device, finds or creates the channel key (a new key is sealed to every device
of every room member), fetches keys it is missing, rotates the key when the server pushes
`rekey` (a member left), and never drops a message it cannot read: it yields it with `error`.
The connection speaks `rt.v1.msgpack`, so keys and ciphertexts travel as raw bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from realtime_safety.client import Client, ServerError
from realtime_safety.protocol import SUBPROTOCOL_MSGPACK

from .e2ee import (
    ALG,
    CryptoError,
    DeviceKeys,
    decrypt,
    encrypt,
    new_channel_key,
    open_key,
    seal_key,
)


async def listed_members(
    request: Callable[..., Awaitable[dict[str, Any]]], channel: str
) -> list[str]:
    """Who the server says is in `channel` (every page of `members`). v1 seals keys to them;
    v2 only compares them with the signed membership log, never uses them as recipients."""
    listed: list[str] = []
    after: str | None = None
    while True:
        page = await request("members", channel=channel, **({"after": after} if after else {}))
        listed += page["members"]
        if not (after := page.get("next")):
            return listed


@dataclass(frozen=True)
class Decrypted:
    channel: str
    seq: int
    user: str
    device: str | None
    client_msg_id: str
    text: str | None  # None when the message could not be read
    error: str | None = None  # why it could not be read
    franking_key: bytes | None = None  # reveal with `text` to report the message
    # v2 only: signed by a device whose certificate chains to its user key, proven in the log
    verified: bool = False


class SecureClient:
    def __init__(
        self,
        urls: list[str] | str,
        token: str | Callable[[], str],
        user: str,
        keys: DeviceKeys,
        *,
        client: Client | None = None,
        **client_options: Any,
    ) -> None:
        """`client`: a connection to use instead of opening one (a v2 client reading v1)."""
        self.client = client or Client(urls, token, fmt=SUBPROTOCOL_MSGPACK, **client_options)
        self.user = user
        self.keys = keys
        self._channel_keys: dict[str, dict[str, bytes]] = {}  # channel -> key id -> key
        self._current: dict[str, str] = {}  # channel -> key id used to send
        self._rekey: set[str] = set()  # channels whose key must rotate before the next send
        self._signing_keys: dict[tuple[str, str], bytes] = {}  # (user, device) -> signing key

    async def __aenter__(self) -> SecureClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def start(self) -> None:
        await self.client.connect()
        await self.client.request("keys.register", **self.keys.registration(self.user))

    async def subscribe(self, channel: str, since_seq: int | None = None) -> dict[str, Any]:
        return await self.client.subscribe(channel, since_seq)

    # --- keys -------------------------------------------------------------------------

    async def rotate(self, channel: str) -> str:
        """A new channel key, sealed to every registered device of every member."""
        members = await listed_members(self.client.request, channel)
        devices: list[dict[str, Any]] = []
        for start in range(0, len(members), 100):
            found = await self.client.request("keys.lookup", users=members[start : start + 100])
            devices += found["devices"]
        key, key_id = new_channel_key(), uuid.uuid4().hex[:16]
        sealed: dict[str, dict[str, bytes]] = {}  # user -> device -> sealed box
        for d in devices:
            sealed.setdefault(d["user"], {})[d["device"]] = seal_key(key, d["identity_key"])
        if self.keys.device not in sealed.get(self.user, {}):
            raise CryptoError("this device is not registered as a member's device")
        await self.client.request("keys.share", channel=channel, key_id=key_id, sealed=sealed)
        self._channel_keys.setdefault(channel, {})[key_id] = key
        self._current[channel] = key_id
        self._rekey.discard(channel)
        return key_id

    async def _key(self, channel: str, key_id: str | None) -> tuple[str, bytes] | None:
        if key_id is not None and key_id in self._channel_keys.get(channel, {}):
            return key_id, self._channel_keys[channel][key_id]
        args: dict[str, Any] = {"channel": channel, "device": self.keys.device}
        if key_id is not None:
            args["key_id"] = key_id
        try:
            found = await self.client.request("keys.fetch", **args)
        except ServerError as exc:
            if exc.code in ("not_found", "forbidden"):
                return None
            raise
        key = open_key(found["sealed"], self.keys)
        self._channel_keys.setdefault(channel, {})[found["key_id"]] = key
        return found["key_id"], key

    async def _signing_key(self, user: str, device: str) -> bytes | None:
        """The signing key of `user`'s device `device` (device ids are scoped per user)."""
        cached = self._signing_keys.get((user, device))
        if cached is None:
            found = await self.client.request("keys.lookup", users=[user])
            for d in found["devices"]:
                self._signing_keys[d["user"], d["device"]] = d["signing_key"]
            cached = self._signing_keys.get((user, device))
        return cached

    # --- messages ---------------------------------------------------------------------

    async def send(
        self, channel: str, text: str, *, client_msg_id: str | None = None
    ) -> dict[str, Any]:
        """Encrypt, sign and publish (retried idempotently across reconnects)."""
        if channel in self._rekey or channel not in self._current:
            newest = None if channel in self._rekey else await self._key(channel, None)
            if newest is None:
                await self.rotate(channel)
            else:
                self._current[channel] = newest[0]
        key_id = self._current[channel]
        key = self._channel_keys[channel][key_id]
        cmid = client_msg_id or uuid.uuid4().hex
        body = encrypt(self.keys, channel, cmid, key_id, key, text)
        return await self.client.publish(channel, body, client_msg_id=cmid)

    async def open(self, push: dict[str, Any]) -> Decrypted:
        """Decrypt one message push (or history item); never raises for a bad message."""
        body, sender = push["body"], push["from"]
        base = {
            "channel": push["channel"],
            "seq": push["seq"],
            "user": sender["user"],
            "device": sender.get("device"),
            "client_msg_id": push["client_msg_id"],
        }
        if body.get("alg") == "none":
            return Decrypted(**base, text=body.get("text"))
        if body.get("alg") != ALG:
            return Decrypted(**base, text=None, error=f"unknown algorithm {body.get('alg')!r}")
        try:
            found = await self._key(push["channel"], body["key_id"])
            if found is None:
                return Decrypted(
                    **base,
                    text=None,
                    error=f"no key {body['key_id']!r} for "
                    "this device (shared before it joined, or not at all)",
                )
            signing = await self._signing_key(sender["user"], body["device"])
            if signing is None:
                return Decrypted(
                    **base, text=None, error="sender device is not registered to the sender"
                )
            plain = decrypt(body, push["channel"], push["client_msg_id"], found[1], signing)
        except CryptoError as exc:
            return Decrypted(**base, text=None, error=exc.reason)
        return Decrypted(**base, text=plain.text, franking_key=plain.franking_key)

    async def messages(self) -> AsyncIterator[Decrypted]:
        """Every message of the subscribed channels, decrypted or marked with `error`.
        `rekey` pushes are handled here: the next `send` to that channel rotates the key."""
        async for push in self.client.pushes():
            message = await self.handle(push)
            if message is not None:
                yield message

    async def handle(self, push: dict[str, Any]) -> Decrypted | None:
        """Process one push: a message is decrypted; `rekey` marks the channel so that the
        next `send` rotates its key; other pushes are ignored here."""
        kind = push.get("push")
        if kind == "rekey":
            self._rekey.add(push["channel"])
        elif kind == "message":
            return await self.open(push)
        return None

    async def report(self, message: Decrypted, reason: str) -> dict[str, Any]:
        """Report a message to moderators, proving its plaintext with the franking opening."""
        args: dict[str, Any] = {"channel": message.channel, "seq": message.seq, "reason": reason}
        if message.text is not None and message.franking_key is not None:
            args["franking"] = {"text": message.text, "key": message.franking_key}
        return await self.client.request("report", **args)
