"""Wire protocol v1 (docs/protocol-v1.md sections 1-2): codecs, error codes, close codes, arguments.

Two codecs speak the same frames: `rt.v1.json` (text frames, bytes as padded base64) and
`rt.v1.msgpack` (binary frames, bytes raw). Decoding failures raise `UndecodableFrame`
(the connection closes 1007); a decodable frame that is not a valid command raises
`ProtocolError` (an error reply; the connection stays open).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

import msgpack

SUBPROTOCOL_JSON: Final = "rt.v1.json"
SUBPROTOCOL_MSGPACK: Final = "rt.v1.msgpack"
SUBPROTOCOLS: Final = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)

# Close codes (section 2).
CLOSE_GOING_AWAY: Final = 1001
CLOSE_UNDECODABLE: Final = 1007
CLOSE_TOO_BIG: Final = 1009
CLOSE_AUTH_TIMEOUT: Final = 4001
CLOSE_AUTH_FAILED: Final = 4003
CLOSE_POLICY: Final = 4008
CLOSE_BANNED: Final = 4009

ERROR_CODES: Final = frozenset(
    {
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "too_large",
        "rate_limited",
        "conflict",
        "unavailable",
        "internal",
    }
)

MAX_COMMAND_ID: Final = 2**53 - 1
# Deepest nesting of objects/arrays in a frame (the frame itself is level 1); deeper: 1007.
# No command needs more than a few levels; deeper values broke repr() and other recursion.
MAX_NESTING: Final = 32


class ProtocolError(Exception):
    """An error reply: `{"id", "ok": false, "error": {"code", "message", ...}}`."""

    def __init__(self, code: str, message: str, *, retry_after_ms: int | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    def to_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after_ms is not None:
            error["retry_after_ms"] = self.retry_after_ms
        return error


class UndecodableFrame(Exception):
    """The frame is not one JSON object / msgpack map: close 1007."""


def _json_default(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot encode {type(value).__name__}")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# An escaped UTF-16 surrogate: JSON lets `"\ud800"` through as a str that is not Unicode text
# (it cannot be encoded again: JWT, SQLite and the reply itself would fail on it).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_B = re.compile(rb"\\u[dD][89a-fA-F]")


def _nested_too_deep(frame: dict[str, Any]) -> bool:
    """Whether containers nest deeper than `MAX_NESTING` (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(frame, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, dict | list):
                if depth >= MAX_NESTING:
                    return True
                stack.append((child, depth + 1))
    return False


def _lone_surrogate(value: object) -> bool:
    """Whether a decoded JSON value holds a lone surrogate (pairs were joined by the parser)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


def wire_frame(data: str | bytes, binary: bool) -> bytes:
    """`data` as a complete, unfragmented, unmasked server frame (RFC 6455 section 5.2):
    the same bytes are valid on every connection that negotiated no extension."""
    payload = data.encode() if isinstance(data, str) else data
    head = 0x82 if binary else 0x81
    n = len(payload)
    if n < 126:
        return bytes((head, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", head, 126, n) + payload
    return struct.pack("!BBQ", head, 127, n) + payload


class Codec:
    """One wire format. `binary` says which WebSocket frame type it uses."""

    name: str
    binary: bool

    def encode(self, obj: Mapping[str, Any]) -> str | bytes:
        raise NotImplementedError

    def decode(self, data: str | bytes) -> dict[str, Any]:
        raise NotImplementedError

    def bytes_field(self, value: object) -> bytes | None:
        """A byte field as received: raw bytes (msgpack) or padded base64 text (JSON)."""
        raise NotImplementedError


class JsonCodec(Codec):
    name = SUBPROTOCOL_JSON
    binary = False

    def encode(self, obj: Mapping[str, Any]) -> str:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=_json_default)

    def decode(self, data: str | bytes) -> dict[str, Any]:
        try:
            obj = json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError, UnicodeDecodeError) as exc:
            raise UndecodableFrame(f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise UndecodableFrame("a frame must be a JSON object")
        if _nested_too_deep(obj):
            raise UndecodableFrame(f"nesting deeper than {MAX_NESTING} levels")
        escaped = (
            _SURROGATE_ESCAPE.search(data)
            if isinstance(data, str)
            else _SURROGATE_ESCAPE_B.search(data)
        )
        if escaped is not None and _lone_surrogate(obj):
            raise UndecodableFrame("invalid JSON: a string holds a lone UTF-16 surrogate")
        return obj

    def bytes_field(self, value: object) -> bytes | None:
        if not isinstance(value, str):
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None


class MsgpackCodec(Codec):
    name = SUBPROTOCOL_MSGPACK
    binary = True

    def encode(self, obj: Mapping[str, Any]) -> bytes:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
        return data

    def decode(self, data: str | bytes) -> dict[str, Any]:
        if isinstance(data, str):
            raise UndecodableFrame("rt.v1.msgpack frames must be binary")
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False, timestamp=0)
        except Exception as exc:  # msgpack raises several unrelated types
            raise UndecodableFrame(f"invalid msgpack: {exc}") from None
        if not isinstance(obj, dict):
            raise UndecodableFrame("a frame must be a msgpack map")
        if _nested_too_deep(obj):
            raise UndecodableFrame(f"nesting deeper than {MAX_NESTING} levels")
        return obj

    def bytes_field(self, value: object) -> bytes | None:
        return bytes(value) if isinstance(value, bytes) else None


JSON: Final = JsonCodec()
MSGPACK: Final = MsgpackCodec()
CODECS: Final[dict[str, Codec]] = {JSON.name: JSON, MSGPACK.name: MSGPACK}


def choose_codec(offered: list[str]) -> Codec | None:
    """The first offered subprotocol we speak; None means "speak JSON, announce nothing"."""
    for name in offered:
        if name in CODECS:
            return CODECS[name]
    return None


# --- command arguments -------------------------------------------------------------------


def command_id(frame: Mapping[str, Any]) -> int | None:
    """The frame's usable `id`, or None (then errors go out as `{"push": "error"}`)."""
    value = frame.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COMMAND_ID:
        return value
    return None


def arg_str(
    frame: Mapping[str, Any], name: str, *, max_len: int = 255, required: bool = True
) -> str | None:
    value = frame.get(name)
    if value is None:
        if required:
            raise ProtocolError("bad_request", f"'{name}' is required")
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise ProtocolError("bad_request", f"'{name}' must be a string of 1-{max_len} characters")
    return value


def arg_int(
    frame: Mapping[str, Any], name: str, *, minimum: int = 0, maximum: int = MAX_COMMAND_ID
) -> int | None:
    value = frame.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ProtocolError("bad_request", f"'{name}' must be an integer in [{minimum}, {maximum}]")
    return value


def require_str(frame: Mapping[str, Any], name: str, *, max_len: int = 255) -> str:
    value = arg_str(frame, name, max_len=max_len)
    assert value is not None
    return value


class Frame:
    """A push, encoded lazily and at most once per codec: as the codec's payload, and as a
    complete WebSocket frame to write to every socket as is."""

    __slots__ = ("_encoded", "_wire", "push")

    def __init__(self, push: dict[str, Any]) -> None:
        self.push = push
        self._encoded: dict[str, str | bytes] = {}
        self._wire: dict[str, bytes] = {}

    def encoded(self, codec: Codec) -> str | bytes:
        data = self._encoded.get(codec.name)
        if data is None:
            data = self._encoded[codec.name] = codec.encode(self.push)
        return data

    def wire(self, codec: Codec) -> bytes:
        data = self._wire.get(codec.name)
        if data is None:
            data = self._wire[codec.name] = wire_frame(self.encoded(codec), codec.binary)
        return data
