"""The server side of end-to-end encryption: the key directory, envelope signature checks and
franking tags (docs/protocol-v1.md sections 5 and 8). The server never holds a key that opens a
message; it checks who signed what and keeps the sealed channel keys members hand each other.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from typing import Any

import nacl.exceptions
from nacl.signing import VerifyKey

from realtime_safety.protocol import Codec, ProtocolError
from realtime_safety.storage import Device, DeviceRef, DocStore, KeyStore, Message

from .directory_v2 import certified_device
from .e2ee import CryptoError, device_statement, frank_commitment, message_statement, pack
from .envelope import ALG as V2_ALG
from .envelope import server_verify_v2

MAX_LOOKUP_USERS = 100
MAX_SHARE_DEVICES = 1000
SEALED_MIN, SEALED_MAX = 48, 256  # a sealed 32-byte key is 80 bytes


def _bytes(codec: Codec, value: object, name: str, size: int) -> bytes:
    data = codec.bytes_field(value)
    if data is None or len(data) != size:
        raise ProtocolError("bad_request", f"'{name}' must be {size} bytes")
    return data


def server_tag(franking_key: bytes, frank: bytes, channel: str, user: str, ts: int) -> bytes:
    """The server's franking tag: the commitment bound to sender, channel and time."""
    data = pack(["rt.v1.ftag", frank, channel, user, ts])
    return hmac.new(franking_key, data, hashlib.sha256).digest()


class KeyDirectory:
    def __init__(
        self,
        keys: KeyStore,
        franking_key: bytes,
        records: DocStore | None = None,
        cache_size: int = 100_000,
    ) -> None:
        self._keys = keys
        self._records = records  # the v2 directory (docs/e2ee/server.md), for v2 envelopes
        self._franking_key = franking_key
        # (user, device) -> its keys; devices never change keys
        self._cache: OrderedDict[DeviceRef, Device] = OrderedDict()
        self._cache_size = cache_size

    async def device(self, user: str, device_id: str) -> Device | None:
        """`user`'s device of that id (device ids are scoped per user)."""
        key = (user, device_id)
        device = self._cache.get(key)
        if device is None:
            device = await self._keys.device(user, device_id)
            if device is None:
                return None
            self._cache[key] = device
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return device

    async def register(self, user: str, frame: dict[str, Any], codec: Codec) -> Device:
        device_id = frame.get("device")
        if not isinstance(device_id, str) or not 1 <= len(device_id) <= 64:
            raise ProtocolError("bad_request", "'device' must be a string of 1-64 characters")
        identity = _bytes(codec, frame.get("identity_key"), "identity_key", 32)
        signing = _bytes(codec, frame.get("signing_key"), "signing_key", 32)
        sig = _bytes(codec, frame.get("sig"), "sig", 64)
        try:
            VerifyKey(signing).verify(device_statement(user, device_id, identity), sig)
        except (nacl.exceptions.BadSignatureError, ValueError):
            raise ProtocolError("forbidden", "sig does not verify with signing_key") from None
        wanted = Device(device_id, user, identity, signing, int(time.time() * 1000))
        stored = await self._keys.register(wanted)  # (user, device): another user's is apart
        if (stored.identity_key, stored.signing_key) != (identity, signing):
            raise ProtocolError("conflict", f"device {device_id!r} is registered with other keys")
        return stored

    async def lookup(self, users: object) -> list[Device]:
        if (
            not isinstance(users, list)
            or not 1 <= len(users) <= MAX_LOOKUP_USERS
            or not all(isinstance(u, str) and 1 <= len(u) <= 128 for u in users)
        ):
            raise ProtocolError(
                "bad_request", f"'users' must be a list of 1-{MAX_LOOKUP_USERS} user ids"
            )
        return await self._keys.devices_of(sorted(set(users)))

    def sealed_map(self, value: object, codec: Codec) -> dict[DeviceRef, bytes]:
        """`sealed: {user: {device: box}}` (device ids are scoped per user) as
        {(user, device): box}."""
        shape = f"'sealed' must map users to {{device: sealed box}}, 1-{MAX_SHARE_DEVICES} in all"
        if not isinstance(value, dict) or not value:
            raise ProtocolError("bad_request", shape)
        out: dict[DeviceRef, bytes] = {}
        for user, boxes in value.items():
            if not isinstance(user, str) or not isinstance(boxes, dict) or not boxes:
                raise ProtocolError("bad_request", shape)
            for device, box in boxes.items():
                data = codec.bytes_field(box)
                if (
                    not isinstance(device, str)
                    or data is None
                    or not (SEALED_MIN <= len(data) <= SEALED_MAX)
                ):
                    raise ProtocolError(
                        "bad_request",
                        f"sealed[{user!r}][{device!r}] must be a sealed box of "
                        f"{SEALED_MIN}-{SEALED_MAX} bytes",
                    )
                out[user, device] = data
                if len(out) > MAX_SHARE_DEVICES:
                    raise ProtocolError("bad_request", shape)
        return out

    async def verify_envelope(
        self, user: str, channel: str, client_msg_id: str, body: dict[str, Any]
    ) -> None:
        """`forbidden` unless the envelope is signed by a device registered to `user` (v1) or
        by a certified, unrevoked device of `user` (v2)."""
        if body["alg"] == V2_ALG:
            await self._verify_v2(user, channel, client_msg_id, body)
            return
        device = await self.device(user, body["device"])
        if device is None:
            raise ProtocolError(
                "forbidden", f"device {body['device']!r} is not registered to the sender"
            )
        statement = message_statement(
            channel, body["device"], client_msg_id, body["key_id"], body["nonce"], body["ct"]
        )
        try:
            VerifyKey(device.signing_key).verify(statement, body["sig"])
        except nacl.exceptions.BadSignatureError:
            raise ProtocolError("forbidden", "envelope signature does not verify") from None

    async def _verify_v2(
        self, user: str, channel: str, client_msg_id: str, body: dict[str, Any]
    ) -> None:
        found = None
        if self._records is not None:
            found = await certified_device(self._records, user, body["device"])
        if found is None:
            raise ProtocolError(
                "forbidden", f"device {body['device']!r} is not a certified device of the sender"
            )
        try:
            server_verify_v2(body, channel, user, client_msg_id, found.ed25519)
        except CryptoError as err:
            raise ProtocolError("forbidden", f"v2 envelope does not verify: {err}") from None

    def tag(self, body: dict[str, Any], channel: str, user: str, ts: int) -> None:
        """Add the server's franking tag to a franked envelope (before it is stored)."""
        if "frank" in body:
            body["ftag"] = server_tag(self._franking_key, body["frank"], channel, user, ts)

    def verify_report(self, message: Message, franking: object, codec: Codec) -> str:
        """The plaintext a reporter reveals, if it is exactly what the sender sent."""
        if not isinstance(franking, dict):
            raise ProtocolError("bad_request", "'franking' must be {text, key}")
        text, key = franking.get("text"), codec.bytes_field(franking.get("key"))
        if not isinstance(text, str) or key is None or len(key) != 32:
            raise ProtocolError("bad_request", "'franking' must be {text: str, key: 32 bytes}")
        frank, ftag = message.body.get("frank"), message.body.get("ftag")
        if not isinstance(frank, bytes) or not isinstance(ftag, bytes):
            raise ProtocolError("bad_request", "that message carries no franking commitment")
        expected = server_tag(self._franking_key, frank, message.channel, message.user, message.ts)
        if not hmac.compare_digest(expected, ftag):
            raise ProtocolError("forbidden", "the stored franking tag does not verify")
        if not hmac.compare_digest(frank_commitment(key, text), frank):
            raise ProtocolError("forbidden", "franking opening does not match the message")
        return text
