"""E2EE v2 people and devices for the server tests: a user key, device accounts certified
under it and published through the wire (`keys.publish`, docs/e2ee/server.md), each device
with its own connection (msgpack: byte fields travel raw)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from conftest import Node, token
from wire import Raw

from realtime_safety.crypto.client_v2 import Decrypted, SecureClient
from realtime_safety.crypto.envelope import DeviceAccount
from realtime_safety.crypto.identity import UserKeyStatement
from realtime_safety.crypto.user_keys import UserKeys

MSGPACK = "rt.v1.msgpack"


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def now_ms() -> int:
    return int(time.time() * 1000)


_announced: dict[bytes, UserKeyStatement] = {}  # one announcement per user key


async def publish_device(raw: Raw, user_keys: UserKeys, account: DeviceAccount) -> dict[str, Any]:
    """Certify `account` under `user_keys` and publish both with `keys.publish`."""
    st = _announced.setdefault(user_keys.public, user_keys.announce(now_ms()))
    cert = user_keys.certify_account(account.olm_account, account.device, now_ms())
    return await raw.ok("keys.publish", user_key=st.to_wire(), device=cert.to_wire())


@dataclass
class Device:
    user: str
    account: DeviceAccount
    raw: Raw

    @property
    def id(self) -> str:
        return self.account.device


@dataclass
class Person:
    user: str
    keys: UserKeys
    devices: list[Device] = field(default_factory=list)

    @classmethod
    def new(cls, name: str) -> Person:
        user = uid(name)
        return cls(user, UserKeys.generate(user))

    async def connect(self, node: Node, device: str | None = None) -> Raw:
        return await Raw.open(node.url, token(self.user, device=device), proto=MSGPACK)

    async def device(self, node: Node, *, publish: bool = True) -> Device:
        """A new device with its own connection; certified and published unless told not."""
        account = DeviceAccount.generate()
        raw = await self.connect(node, account.device)
        if publish:
            await publish_device(raw, self.keys, account)
        dev = Device(self.user, account, raw)
        self.devices.append(dev)
        return dev

    async def revoke(self, dev: Device) -> None:
        rev = self.keys.revoke(dev.id, now_ms())
        await dev.raw.ok("keys.revoke", revocation=rev.to_wire())

    async def close(self) -> None:
        for dev in self.devices:
            await dev.raw.close()


# --- reading what a v2 client yields -------------------------------------------------------


async def next_message(chat: SecureClient, timeout: float = 5) -> Decrypted:
    async with asyncio.timeout(timeout):
        return await anext(chat.messages())


async def read_until(chat: SecureClient, text: str, timeout: float = 5) -> list[Decrypted]:
    """Every message `chat` yields up to and including the first whose text is `text` (a
    sentinel an honest user sends after the attack: whatever the attack caused comes first)."""
    got: list[Decrypted] = []
    async with asyncio.timeout(timeout):
        async for message in chat.messages():
            got.append(message)
            if message.text == text:
                return got
    raise AssertionError("unreachable")
