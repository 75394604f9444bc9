"""The shared ground of E2EE v2 messages (crypto/envelope.py): constants, msgpack and base64
at the boundary, signature checks and the container our session stores are pickled into.
Every size and tag here is specified in docs/e2ee/messages.md."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Any

import msgpack
import nacl.exceptions
from nacl.signing import VerifyKey

from .e2ee import CryptoError, pack

ALG = "megolm.v1"
VERSION = 2
SHARE_TAG = "rt.v2.share"
MESSAGE_TAG = "rt.v2.msg"

ROTATE_AFTER_MESSAGES = 100
ROTATE_AFTER_MS = 24 * 60 * 60 * 1000

KEY_BYTES = 32  # Ed25519 / Curve25519 public keys, franking keys
SIG_BYTES = 64
FRANK_BYTES = 32
SESSION_ID_CHARS = 43  # unpadded base64 of a 32-byte Ed25519 key
SESSION_KEY_BYTES = 229  # a vodozemac/libolm Megolm SessionKey, decoded
MAX_ID_CHARS = 64  # device ids and client_msg_ids, as in v1
MAX_MM_BYTES = 64 * 1024
MAX_STH_BYTES = 4 * 1024
MAX_INDEX = 2**32 - 1
MAX_TS = 2**63 - 1
MAX_OLM_SESSIONS_PER_DEVICE = 8

STORE_MAGIC = b"rt-v2-store"

# (channel, sender_user, sender_device, session_id): the only key Megolm sessions are found by
SessionRef = tuple[str, str, str, str]
# (channel, sender_user, sender_device, epoch) -> may that device hand out keys for the channel?
MemberCheck = Callable[[str, str, str, int], bool]


def unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CryptoError(f"{what} is not msgpack: {exc}") from None


def b64_encode(raw: bytes) -> str:
    """vodozemac's base64: standard alphabet, no padding."""
    return base64.b64encode(raw).decode().rstrip("=")


def b64_decode(text: str) -> bytes:
    """The inverse of `b64_encode`; CryptoError for anything that is not base64."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError("not unpadded base64") from None


def now_ms() -> int:
    return int(time.time() * 1000)


def verify(key: bytes, message: bytes, sig: bytes, reason: str) -> None:
    """A detached Ed25519 signature by `key` over `message`, or CryptoError(`reason`)."""
    try:
        VerifyKey(key).verify(message, sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        raise CryptoError(reason) from None


def is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def is_str(value: object, low: int, high: int) -> bool:
    return isinstance(value, str) and low <= len(value) <= high


def is_bytes(value: object, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def store(kind: str, entries: Any) -> bytes:
    """The versioned container of a session store (entries are already pickled/encrypted)."""
    return pack({"magic": STORE_MAGIC, "kind": kind, "v": 1, "entries": entries})


def unstore(data: bytes, kind: str) -> Any:
    outer = unpack(data, f"{kind} store")
    if (
        not isinstance(outer, dict)
        or outer.get("magic") != STORE_MAGIC
        or outer.get("kind") != kind
        or outer.get("v") != 1
    ):
        raise CryptoError(f"{kind} store is damaged or of another kind")
    return outer["entries"]
