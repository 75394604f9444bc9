"""To-device messages (E2EE v2, docs/e2ee/server.md, "To-device messages"): the transport of
Olm messages (key shares) from one certified device to another. The server stores opaque
ciphertext per recipient device until that device fetches and acknowledges it, and tells the
recipient user on `user:<id>` that something is waiting; it never reads the messages.

Records (`store.records`, coll `todevice`): key `<user>|<device>|<%013d ts>|<random>`, doc
`{id, from_user, from_device, type, ct, ts}` with `id` the key's last two parts, index `ts`.
At most MAX_WAITING wait per device; they expire after TTL_MS (purged lazily: expired ones are
deleted when their device fetches, and every node drops all expired ones at most once a
minute as it serves a send or a fetch).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from realtime_safety.channels.broker import BrokerUnavailable
from realtime_safety.protocol import (
    Feature,
    ProtocolError,
    Reply,
    Session,
    arg_int,
    arg_str,
    valid_user_id,
)
from realtime_safety.storage import DocStore

from .directory_v2 import certified_device

log = logging.getLogger("realtime.todevice")

COLL: Final = "todevice"
MAX_SEND: Final = 100  # messages per todevice.send
MAX_CT_BYTES: Final = 64 * 1024
MAX_WAITING: Final = 1000  # per recipient device
MAX_FETCH: Final = 100
MAX_ACK: Final = 1000
TTL_MS: Final = 30 * 24 * 3600 * 1000
PURGE_EVERY_S: Final = 60.0
OLM_TYPES: Final = (0, 1)  # pre-key, normal (as Olm)
_ID: Final = re.compile(r"[0-9]{13}\|[0-9a-f]{16}")

# (channel, push) -> the push delivered to the channel's subscribers on every node
Publish = Callable[[str, dict[str, Any]], Awaitable[None]]


def device_arg(session: Session, frame: dict[str, Any], name: str = "device") -> str:
    """A device id argument (default: the token's `device` claim). `|` separates the parts of
    record keys, so a device id holding one is refused (it could not be told apart)."""
    device = arg_str(frame, name, max_len=64, required=False) or session.identity.device
    if device is None:
        raise ProtocolError("bad_request", f"'{name}' is required (or a token device claim)")
    if "|" in device:
        raise ProtocolError("bad_request", f"'{name}' must not contain '|'")
    return device


async def own_device(session: Session, records: DocStore, device: str) -> bytes:
    """The Ed25519 key of the caller's certified, unrevoked `device`; `forbidden` otherwise."""
    found = await session.bounded(certified_device(records, session.identity.user, device))
    if found is None:
        raise ProtocolError("forbidden", f"you have no certified, unrevoked device {device!r}")
    return found.ed25519


async def publish_quietly(publish: Publish, channel: str, push: dict[str, Any]) -> None:
    """A push whose loss costs only latency (the client fetches on reconnect anyway)."""
    try:
        await publish(channel, push)
    except (BrokerUnavailable, OSError, TimeoutError) as exc:
        log.warning("%s push on %s not published: %s", push.get("push"), channel, exc)


class ToDeviceOps(Feature):
    def __init__(self, records: DocStore, publish: Publish) -> None:
        self._records = records
        self._publish = publish
        self._purged_at = 0.0
        self._last = (0, 0)  # (ms, count): the newest id's stamp on this node
        self.ops = {
            "todevice.send": self.send,
            "todevice.fetch": self.fetch,
            "todevice.ack": self.ack,
        }
        self.shed = frozenset({"todevice.send"})  # chat work: key shares for chat sessions

    def _messages(
        self, session: Session, frame: dict[str, Any]
    ) -> list[tuple[str, str, int, bytes]]:
        value = frame.get("messages")
        shape = f"'messages' must be a list of 1-{MAX_SEND} {{user, device, type, ct}}"
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_SEND:
            raise ProtocolError("bad_request", shape)
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                raise ProtocolError("bad_request", shape)
            user, device, kind = m.get("user"), m.get("device"), m.get("type")
            ct = session.codec.bytes_field(m.get("ct"))
            if not valid_user_id(user):
                raise ProtocolError("bad_request", f"messages[{i}].user is not a user id")
            if not isinstance(device, str) or not 1 <= len(device) <= 64 or "|" in device:
                raise ProtocolError(
                    "bad_request", f"messages[{i}].device must be 1-64 characters, no '|'"
                )
            if isinstance(kind, bool) or kind not in OLM_TYPES:
                raise ProtocolError("bad_request", f"messages[{i}].type must be 0 or 1")
            if not ct:
                raise ProtocolError("bad_request", f"messages[{i}].ct must be non-empty bytes")
            if len(ct) > MAX_CT_BYTES:
                raise ProtocolError("too_large", f"messages[{i}].ct is over {MAX_CT_BYTES} bytes")
            assert isinstance(user, str)
            out.append((user, device, int(kind), ct))
        return out

    async def _waiting(self, session: Session, user: str, device: str) -> int:
        """How many messages wait for the device (counting at most MAX_WAITING + 1)."""
        prefix = f"{user}|{device}|"
        return await session.bounded(self._records.count(COLL, prefix, MAX_WAITING + 1))

    async def send(self, session: Session, frame: dict[str, Any]) -> Reply:
        sender = session.identity.user
        from_device = device_arg(session, frame)
        messages = self._messages(session, frame)
        await own_device(session, self._records, from_device)
        now = int(time.time() * 1000)
        await self._purge(session, now - TTL_MS)  # expired messages take no room
        per_device: dict[tuple[str, str], int] = {}
        for user, device, _, _ in messages:
            per_device[user, device] = per_device.get((user, device), 0) + 1
        for (user, device), n in per_device.items():
            if await session.bounded(certified_device(self._records, user, device)) is None:
                raise ProtocolError(
                    "not_found", f"{user!r} has no certified, unrevoked device {device!r}"
                )
            if await self._waiting(session, user, device) + n > MAX_WAITING:
                raise ProtocolError(
                    "too_large",
                    f"{MAX_WAITING} messages already wait for {user!r}'s device {device!r}",
                )
        for user, device, kind, ct in messages:
            msg_id = self._next_id(now)
            doc = {
                "id": msg_id,
                "from_user": sender,
                "from_device": from_device,
                "type": kind,
                "ct": ct,
                "ts": now,
            }
            await session.bounded(
                self._records.insert(COLL, f"{user}|{device}|{msg_id}", doc, ix=now)
            )
        for user, device in per_device:
            push = {"push": "todevice", "device": device}
            await publish_quietly(self._publish, f"user:{user}", push)
        return {"sent": len(messages)}

    def _next_id(self, now: int) -> str:
        """`<%013d ms>|<16 hex>`, increasing on this node (so a batch keeps its order, and
        so do sends of one connection: an Olm pre-key message must come before the normal
        messages of its session); the last 10 hex digits are random."""
        ms, n = self._last
        self._last = (ms, n + 1) if now <= ms else (now, 0)
        ms, n = self._last
        return f"{ms:013d}|{n:06x}{secrets.token_hex(5)}"

    async def fetch(self, session: Session, frame: dict[str, Any]) -> Reply:
        user = session.identity.user
        device = device_arg(session, frame)
        limit = arg_int(frame, "limit", minimum=1, maximum=MAX_FETCH) or MAX_FETCH
        await own_device(session, self._records, device)
        cutoff = int(time.time() * 1000) - TTL_MS
        await self._purge(session, cutoff)
        prefix = f"{user}|{device}|"
        docs = await session.bounded(self._records.prefix(COLL, prefix, limit))
        out = []
        for d in docs:
            if d["ts"] < cutoff:
                await session.bounded(self._records.delete(COLL, prefix + d["id"]))
                continue
            out.append(
                {
                    "id": d["id"],
                    "from": {"user": d["from_user"], "device": d["from_device"]},
                    "type": d["type"],
                    "ct": d["ct"],
                    "ts": d["ts"],
                }
            )
        return {"messages": out}

    async def _purge(self, session: Session, cutoff: int) -> None:
        """Every expired message of every device, at most once per PURGE_EVERY_S per node."""
        if time.monotonic() - self._purged_at < PURGE_EVERY_S:
            return
        self._purged_at = time.monotonic()
        deleted = await session.bounded(self._records.delete_below(COLL, cutoff))
        if deleted:
            log.info("to-device: %d expired messages deleted", deleted)

    async def ack(self, session: Session, frame: dict[str, Any]) -> Reply:
        user = session.identity.user
        device = device_arg(session, frame)
        ids = frame.get("ids")
        if (
            not isinstance(ids, list)
            or not 1 <= len(ids) <= MAX_ACK
            or not all(isinstance(i, str) and _ID.fullmatch(i) for i in ids)
        ):
            raise ProtocolError(
                "bad_request", f"'ids' must be a list of 1-{MAX_ACK} message ids from fetch"
            )
        await own_device(session, self._records, device)
        deleted = 0
        for msg_id in dict.fromkeys(ids):
            if await session.bounded(self._records.delete(COLL, f"{user}|{device}|{msg_id}")):
                deleted += 1
        return {"deleted": deleted}
