"""Hostile frames for protocol v1: one generator, driven either by a seeded `random.Random`
(the `bad-input` scenario: 100,000 frames in seconds) or by Hypothesis (`hostile_frames()`, for
`@given` in the tests, with shrinking). Both drivers make the same choices through `Chooser`, so
the tests and the scenario exercise exactly the same space.

Each frame is a valid command of some op, then mutated one way (a `kind`): wrong types, missing
fields, huge numbers, deep nesting, invalid UTF-8 (raw bytes, escaped lone surrogates), msgpack
garbage, binary frames on `rt.v1.json`, text frames on `rt.v1.msgpack`, oversize frames, bad
ids, unknown ops; or sent before `auth`. `Hostile` says which close codes the server may answer
with (docs/protocol.md) and whether it must close; every other answer must be a reply whose
error code is documented.
"""

from __future__ import annotations

import base64
import json
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgpack
from hypothesis import strategies as st

from realtime_safety.protocol import MAX_NESTING

JSON_PROTO = "rt.v1.json"
MSGPACK_PROTO = "rt.v1.msgpack"
PROTOS = (JSON_PROTO, MSGPACK_PROTO)

# Close codes the protocol documents (docs/protocol.md, docs/protocol-v1.md section 1).
DOCUMENTED_CLOSES = frozenset({1000, 1001, 1007, 1009, 1011, 4001, 4003, 4008, 4009})

T = TypeVar("T")


class Chooser(Protocol):
    """Every choice the generator makes."""

    def integer(self, lo: int, hi: int) -> int: ...

    def pick(self, options: Sequence[T]) -> T: ...

    def blob(self, n: int) -> bytes: ...


class RandomChooser:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def blob(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class DrawChooser:
    """Choices drawn by Hypothesis inside a `@st.composite` strategy."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        value: int = self.draw(st.integers(lo, hi))
        return value

    def pick(self, options: Sequence[T]) -> T:
        value: T = self.draw(st.sampled_from(options))
        return value

    def blob(self, n: int) -> bytes:
        if n <= 64:
            data: bytes = self.draw(st.binary(min_size=n, max_size=n))
            return data
        # Large blobs from a drawn seed: Hypothesis' own buffer is a few KB.
        return random.Random(self.draw(st.integers(0, 2**32))).randbytes(n)


@dataclass(frozen=True, slots=True)
class Hostile:
    kind: str
    payload: bytes  # the frame's bytes (possibly not UTF-8 even when `text`)
    text: bool  # a text frame (else binary)
    proto: str  # the subprotocol of the connection it is sent on
    authed: bool  # sent after a successful auth (else as the first frame)
    closes: frozenset[int]  # close codes the server may answer with
    must_close: bool  # the server must close (no reply)


# --- valid commands --------------------------------------------------------------------

CHANNELS = (
    *(f"public:fz{i}" for i in range(8)),
    "room:fz",
    "user:fz",
    "alert:fz",
    "public:",
    "nope:x",
    "public:" + "x" * 300,
)
HUGE_INTS = (2**53 - 1, 2**53, 2**63 - 1, 2**64 - 1, -(2**63), -1, 0, 10**30, 10**300)
NASTY_STRINGS = ("", "\x00", "\u202e", "\U0001f600" * 50, "a" * 5000, "'\"\\", "%s%n", "\ufeff")


def _str(c: Chooser, max_len: int = 12) -> str:
    return "".join(c.pick("abcxyz019_.-@:é😀") for _ in range(c.integer(1, max_len)))


def _value(c: Chooser, depth: int = 0) -> Any:
    """Any value a decoder can produce (bytes: raw in msgpack, base64 text in JSON)."""
    k = c.integer(0, 9 if depth < 2 else 6)
    if k == 0:
        return None
    if k == 1:
        return c.pick((True, False))
    if k == 2:
        return c.pick(HUGE_INTS)
    if k == 3:
        return c.integer(-1000, 1000)
    if k == 4:
        return c.pick((0.5, -0.0, 1e308, -1e308, 5e-324, 1.0))
    if k == 5:
        return c.pick(NASTY_STRINGS) if c.integer(0, 3) == 0 else _str(c)
    if k == 6:
        return c.blob(c.integer(0, 80))
    if k == 7:
        return [_value(c, depth + 1) for _ in range(c.integer(0, 4))]
    return {_str(c, 6): _value(c, depth + 1) for _ in range(c.integer(0, 4))}


def _location(c: Chooser) -> dict[str, Any]:
    return {
        "lat": c.integer(-90, 90) + 0.5,
        "lon": c.integer(-180, 180) + 0.25,
        "accuracy_m": c.integer(0, 100),
        "ts": 1_700_000_000_000 + c.integer(0, 10**9),
    }


def _body(c: Chooser) -> dict[str, Any]:
    if c.integer(0, 1):
        return {"v": 1, "alg": "none", "text": _str(c, 40)}
    return {
        "v": 1,
        "alg": "xchacha20poly1305",
        "device": "d1",
        "key_id": "k1",
        "nonce": c.blob(24),
        "ct": c.blob(c.integer(1, 64)),
        "sig": c.blob(64),
    }


_FIELDS: dict[str, Callable[[Chooser], dict[str, Any]]] = {
    "ping": lambda c: {},
    "auth": lambda c: {"token": _str(c, 40)},
    "refresh": lambda c: {"token": _str(c, 40)},
    "subscribe": lambda c: {"channel": c.pick(CHANNELS), "since_seq": c.integer(0, 50)},
    "unsubscribe": lambda c: {"channel": c.pick(CHANNELS)},
    "publish": lambda c: {
        "channel": c.pick(CHANNELS),
        "client_msg_id": _str(c, 20),
        "body": _body(c),
    },
    "history": lambda c: {"channel": c.pick(CHANNELS), "before_seq": c.integer(1, 99)},
    "typing": lambda c: {"channel": c.pick(CHANNELS)},
    "read": lambda c: {"channel": c.pick(CHANNELS), "seq": c.integer(0, 99)},
    "presence": lambda c: {"channel": c.pick(CHANNELS), "limit": c.integer(1, 1000)},
    "presence.invisible": lambda c: {"invisible": c.pick((True, False))},
    "keys.register": lambda c: {
        "device": _str(c),
        "identity_key": c.blob(32),
        "signing_key": c.blob(32),
        "sig": c.blob(64),
    },
    "keys.lookup": lambda c: {"users": [_str(c) for _ in range(c.integer(1, 3))]},
    "keys.share": lambda c: {
        "channel": c.pick(CHANNELS),
        "key_id": "k1",
        "sealed": {_str(c): {_str(c): c.blob(48)}},  # {user: {device: box}}
    },
    "keys.fetch": lambda c: {"channel": c.pick(CHANNELS), "key_id": "k1"},
    "members": lambda c: {"channel": "room:fz", "limit": c.integer(1, 1000)},
    "report": lambda c: {"channel": c.pick(CHANNELS), "seq": c.integer(1, 9), "reason": _str(c)},
    "alert.trigger": lambda c: {"client_alert_id": _str(c), "location": _location(c)},
    "alert.location": lambda c: {"alert_id": _str(c), "location": _location(c)},
    "alert.ack": lambda c: {"alert_id": _str(c)},
    "alert.received": lambda c: {"alert_id": _str(c), "route": c.pick(("ws", "push", "sms"))},
    "alert.resolve": lambda c: {"alert_id": _str(c), "outcome": _str(c)},
    "alert.status": lambda c: {"alert_id": _str(c)},
    "location.share": lambda c: {"location": _location(c)},
    "mod.watch": lambda c: {"pattern": _str(c)},
    "mod.ban": lambda c: {"user": _str(c), "reason": _str(c)},
    "mod.reports": lambda c: {"state": "open"},
}
OPS = tuple(_FIELDS)


def valid_command(c: Chooser) -> dict[str, Any]:
    op = c.pick(OPS)
    return {"id": c.integer(1, 2**31), "op": op, **_FIELDS[op](c)}


# --- encoding --------------------------------------------------------------------------


def _json_default(value: object) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(type(value).__name__)


def encode(frame: Any, proto: str) -> bytes:
    """A frame as its subprotocol sends it (out-of-range msgpack integers are clamped)."""
    if proto == JSON_PROTO:
        return json.dumps(frame, default=_json_default, ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
    try:
        packed: bytes = msgpack.packb(frame, use_bin_type=True)
    except (OverflowError, ValueError):
        packed = msgpack.packb(_clamp(frame), use_bin_type=True)
    return packed


def _clamp(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | list | dict):
        return value
    if isinstance(value, int):
        return max(-(2**63), min(2**64 - 1, value))
    if isinstance(value, list):
        return [_clamp(v) for v in value]
    return {k: _clamp(v) for k, v in value.items()}


def _splice(frame: dict[str, Any], key: str, raw_value: bytes, proto: str) -> bytes:
    """`frame` plus `key` whose encoded value is `raw_value` (built without recursion)."""
    if proto == JSON_PROTO:
        head = encode(frame, proto)[:-1]
        sep = b"," if len(head) > 1 else b""
        return head + sep + json.dumps(key).encode() + b":" + raw_value + b"}"
    pairs = b"".join(encode(k, proto) + encode(v, proto) for k, v in frame.items())
    n = len(frame) + 1
    header = bytes((0x80 | n,)) if n < 16 else b"\xde" + struct.pack("!H", n)
    return header + pairs + encode(key, proto) + raw_value


# --- mutations -------------------------------------------------------------------------

# kind -> weight (out of the sum): most keep the connection open, so most frames are handled
# by the command path rather than by reconnecting.
KINDS: dict[str, int] = {
    "wrong-type": 20,
    "missing-field": 12,
    "huge-number": 12,
    "bad-id": 8,
    "unknown-op": 8,
    "extra-fields": 8,
    "deep-nesting": 6,
    "surrogate-escape": 4,
    "invalid-utf8": 4,
    "msgpack-garbage": 5,
    "wrong-frame-type": 4,
    "oversize": 2,
    "pre-auth": 3,
}
_KIND_LIST = tuple(k for k, w in KINDS.items() for _ in range(w))
_OPEN: frozenset[int] = frozenset()
_INVALID = frozenset({1007})


def hostile_frame(
    c: Chooser, proto: str, *, authed: bool = True, max_frame_bytes: int = 128 * 1024
) -> Hostile:
    """One hostile frame for a connection speaking `proto` (authenticated unless `authed` is
    false, in which case the frame is the connection's first)."""
    kind = c.pick(_KIND_LIST)
    if kind == "pre-auth" or not authed:
        inner = _mutated(c, proto, c.pick(tuple(k for k in KINDS if k != "pre-auth")), 0)
        # Before auth every frame ends the connection: 4003 (unauthorized), or the frame's
        # own 1007/1009.
        return Hostile(
            "pre-auth", inner.payload, inner.text, proto, False, frozenset({4003, 1007, 1009}), True
        )
    return _mutated(c, proto, kind, max_frame_bytes)


def _mutated(c: Chooser, proto: str, kind: str, max_frame_bytes: int) -> Hostile:
    frame = valid_command(c)
    binary = proto == MSGPACK_PROTO

    def done(payload: bytes, closes: frozenset[int] = _OPEN, must: bool = False) -> Hostile:
        return Hostile(kind, payload, not binary, proto, True, closes, must)

    fields = [k for k in frame if k not in ("id", "op")] or ["op"]
    if kind == "wrong-type":
        frame[c.pick([*fields, "id", "op"])] = _value(c)
        return done(encode(frame, proto))
    if kind == "missing-field":
        for _ in range(c.integer(1, len(frame))):
            frame.pop(c.pick(list(frame)), None)
        return done(encode(frame, proto))
    if kind == "huge-number":
        frame[c.pick([*fields, "id"])] = c.pick(HUGE_INTS)
        if proto == JSON_PROTO and c.integer(0, 2) == 0:
            literal = c.pick((b"1e400", b"-1e400", b"1" * 5000, b"1e-400", b"-0"))
            return done(_splice(frame, c.pick(fields), literal, proto), _INVALID)
        return done(encode(frame, proto))
    if kind == "bad-id":
        frame["id"] = c.pick((-1, 2**53, 1.5, "1", True, None, [], {}))
        if c.integer(0, 1):
            del frame["id"]
        return done(encode(frame, proto))
    if kind == "unknown-op":
        frame["op"] = c.pick(("", "PING", "ping ", "mod.", "__class__", "_op_ping", "x" * 500))
        return done(encode(frame, proto))
    if kind == "extra-fields":
        for _ in range(c.integer(1, 20)):
            frame[_str(c, 8)] = _value(c)
        return done(encode(frame, proto))
    if kind == "deep-nesting":
        # The frame is level 1 and the value adds `depth` levels: at most 32 in all (else 1007).
        depth = c.pick((5, 31, 32, 100, 1000, 30000))
        if proto == JSON_PROTO:
            o, e = c.pick(((b"[", b"]"), (b'{"a":', b"}")))
            raw = o * depth + b"1" + e * depth
        else:
            raw = b"\x91" * depth + b"\xc0"
        too_deep = depth + 1 > MAX_NESTING
        closes = frozenset({1007, 1009}) if too_deep else _OPEN
        return done(_splice(frame, c.pick(fields), raw, proto), closes, too_deep)
    if kind == "surrogate-escape":
        # Valid UTF-8 JSON with an escaped lone surrogate (msgpack: a str that is not UTF-8).
        if proto == JSON_PROTO:
            frame[c.pick([*fields, "op"])] = c.pick(("\ud800", "x\udfff", "\udc00\ud800"))
            text = json.dumps(frame, default=_json_default, ensure_ascii=True).encode()
            return done(text, _INVALID)
        raw = b"\xa3\xed\xa0\x80"  # fixstr of an encoded surrogate
        return done(_splice(frame, c.pick(fields), raw, proto), _INVALID, True)
    if kind == "invalid-utf8":
        bad = c.pick((b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88"))
        payload = encode(frame, JSON_PROTO)
        cut = c.integer(0, len(payload))
        # A text frame that is not UTF-8: the WebSocket layer itself closes 1007.
        return Hostile(kind, payload[:cut] + bad + payload[cut:], True, proto, True, _INVALID, True)
    if kind == "msgpack-garbage":
        packed = encode(frame, MSGPACK_PROTO)
        how = c.integer(0, 3)
        if how == 0:
            data = c.blob(c.integer(1, 200))
        elif how == 1:
            data = packed[: c.integer(0, max(0, len(packed) - 1))]
        elif how == 2:
            mutable = bytearray(packed)
            for _ in range(c.integer(1, 5)):
                mutable[c.integer(0, len(mutable) - 1)] = c.integer(0, 255)
            data = bytes(mutable)
        else:  # an ext type, a map keyed by non-strings, a huge declared length
            data = c.pick((b"\xd4\x05\x00", b"\x81\x01\x02", b"\xdf\xff\xff\xff\xff", b"\xc1"))
        # Sent as binary; on rt.v1.json binary frames are UTF-8 JSON, which this is not.
        return Hostile(kind, bytes(data), False, proto, True, _INVALID, False)
    if kind == "wrong-frame-type":
        if proto == JSON_PROTO:
            # Binary on rt.v1.json: allowed when it is UTF-8 JSON, 1007 when it is msgpack.
            if c.integer(0, 1):
                return Hostile(kind, encode(frame, JSON_PROTO), False, proto, True, _OPEN, False)
            return Hostile(kind, encode(frame, MSGPACK_PROTO), False, proto, True, _INVALID, True)
        # Text on rt.v1.msgpack is always 1007.
        return Hostile(kind, encode(frame, JSON_PROTO), True, proto, True, _INVALID, True)
    if kind == "oversize":
        size = max_frame_bytes + c.integer(1, 4096)
        frame["pad"] = "x" * size
        return done(encode(frame, proto), frozenset({1009}), True)
    raise ValueError(kind)


@st.composite
def hostile_frames(
    draw: Callable[[st.SearchStrategy[Any]], Any],
    proto: str | None = None,
    max_frame_bytes: int = 128 * 1024,
) -> Hostile:
    """The same frames as `hostile_frame`, chosen by Hypothesis."""
    c = DrawChooser(draw)
    return hostile_frame(c, proto or c.pick(PROTOS), max_frame_bytes=max_frame_bytes)
