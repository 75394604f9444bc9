"""Property tests of the frame parsers: any input is a command, or a clean refusal.

The inputs are mostly valid (so the accept paths run and their output is checked against
what went in) with one targeted corruption at a time, each with the outcome it must have;
fully random bytes are kept as one case among them. `event()` labels every example: see
them with `pytest tests/test_codec.py --hypothesis-show-statistics`."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from realtime_safety.channels.body import parse_body
from realtime_safety.channels.names import NAMESPACES, parse_channel
from realtime_safety.protocol import (
    JSON,
    MAX_COMMAND_ID,
    MAX_NESTING,
    MSGPACK,
    Codec,
    ProtocolError,
    UndecodableFrame,
    command_id,
)

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

# --- frames ------------------------------------------------------------------------------

CHANNEL_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:@-"
OPS = ["auth", "ping", "subscribe", "unsubscribe", "publish", "history", "typing", "read"]


# (strategies are built once, here: building them inside a composite on every draw is slow)
channel_names = st.builds(
    lambda namespace, rest: f"{namespace}:{rest}",
    st.sampled_from(sorted(NAMESPACES)),
    st.text(CHANNEL_CHARS, min_size=1, max_size=40),
)


def json_values(binary: bool) -> st.SearchStrategy[Any]:
    """Argument values a client sends (bytes only where the wire format has them)."""
    leaf = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    if binary:
        leaf = leaf | st.binary(max_size=20)
    return st.recursive(
        leaf,
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=8), children, max_size=3)
        ),
        max_leaves=8,
    )


ARGUMENTS = {
    binary: st.dictionaries(st.text(max_size=8), json_values(binary), max_size=3)
    for binary in (False, True)
}


@st.composite
def command_frames(draw: st.DrawFn, binary: bool) -> dict[str, Any]:
    frame: dict[str, Any] = draw(ARGUMENTS[binary])  # arguments; then the command's fields
    frame["id"] = draw(st.integers(0, MAX_COMMAND_ID))
    frame["op"] = draw(st.sampled_from(OPS))
    if draw(st.booleans()):
        frame["channel"] = draw(channel_names)
    if draw(st.booleans()):
        frame["client_msg_id"] = draw(st.text(min_size=1, max_size=64))
    return frame


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


CORRUPTIONS = ["none"] * 4 + [
    "truncate",
    "trailing",
    "flip",
    "not_object",
    "too_deep",
    "deepest_allowed",
    "lone_surrogate",
    "random",
]


@st.composite
def wire_inputs(
    draw: st.DrawFn, codec: Codec
) -> tuple[str | bytes, dict[str, Any] | None, str | None]:
    """(data, the frame it must decode to or None, the corruption): None means it must be
    refused; "flip" and "random" may go either way (then only "a dict or a refusal")."""
    binary = codec is MSGPACK
    frame = draw(command_frames(binary))
    corruption = draw(st.sampled_from(CORRUPTIONS))
    if corruption == "lone_surrogate" and binary:
        corruption = "none"
    event(f"{codec.name}: {corruption}")
    expected: dict[str, Any] | None = None
    if corruption == "too_deep":
        frame["deep"] = nested(MAX_NESTING)
    elif corruption == "deepest_allowed":
        frame["deep"] = nested(MAX_NESTING - 1)
        expected = frame
    elif corruption in ("none", "flip"):
        expected = frame
    data = codec.encode(frame)
    if corruption == "not_object":
        data = codec.encode({"x": [frame]})
        data = data[5:-1] if isinstance(data, str) else MSGPACK.encode([frame])  # the list
    elif corruption == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif corruption == "trailing":
        data = data + (
            draw(st.sampled_from(["x", "{}", "1"])) if isinstance(data, str) else b"\x01"
        )
    elif corruption == "flip":
        raw = bytearray(data.encode() if isinstance(data, str) else data)
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] ^= draw(st.integers(1, 255))
        data = bytes(raw)
        expected = None  # either way
    elif corruption == "lone_surrogate":
        assert isinstance(data, str)
        data = data[:-1] + ',"s":"\\ud800"}'
    elif corruption == "random":
        data = draw(st.binary(max_size=64) | st.text(max_size=64))
    if not binary and corruption not in ("flip", "random") and draw(st.booleans()):
        assert isinstance(data, str)
        data = data.encode()  # a JSON text frame may reach the decoder as UTF-8 bytes
    return data, expected, corruption


def check_decode(codec: Codec, case: tuple[str | bytes, dict[str, Any] | None, str | None]) -> None:
    data, expected, corruption = case
    try:
        frame = codec.decode(data)
    except UndecodableFrame:
        assert corruption not in ("none", "deepest_allowed"), data
        return
    assert isinstance(frame, dict)
    if corruption in ("flip", "random"):
        return  # a changed byte may still be a valid frame
    assert corruption in ("none", "deepest_allowed"), f"{corruption} was accepted: {data!r}"
    assert frame == expected
    assert command_id(frame) == frame["id"]


@given(wire_inputs(MSGPACK))
def test_msgpack_decode_accepts_frames_and_refuses_corruption_cleanly(case: Any) -> None:
    check_decode(MSGPACK, case)


@given(wire_inputs(JSON))
def test_json_decode_accepts_frames_and_refuses_corruption_cleanly(case: Any) -> None:
    check_decode(JSON, case)


@given(st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_msgpack_round_trip(frame: dict[str, Any]) -> None:
    assert MSGPACK.decode(MSGPACK.encode(frame)) == frame


@given(st.binary(max_size=64))
def test_json_bytes_are_padded_base64(data: bytes) -> None:
    text = JSON.encode({"b": data})
    assert JSON.decode(text)["b"] == base64.b64encode(data).decode()
    assert JSON.bytes_field(JSON.decode(text)["b"]) == data


IDS = st.one_of(
    st.integers(0, MAX_COMMAND_ID).map(lambda i: ("valid", i)),
    st.sampled_from([0, 1, MAX_COMMAND_ID]).map(lambda i: ("valid", i)),
    st.sampled_from([-1, MAX_COMMAND_ID + 1, 2**64 - 1]).map(lambda i: ("out of range", i)),
    st.integers(-(2**63), -1).map(lambda i: ("out of range", i)),
    st.booleans().map(lambda b: ("bool", b)),
    st.floats().map(lambda f: ("float", f)),
    st.text(max_size=5).map(lambda s: ("text", s)),
    st.none().map(lambda n: ("missing", n)),
)


@given(IDS, st.dictionaries(st.text(max_size=8), values, max_size=4))
def test_command_id_is_a_safe_integer_or_none(
    kind_id: tuple[str, Any], rest: dict[str, Any]
) -> None:
    kind, cid = kind_id
    event(kind)
    frame = {**rest, "id": cid}
    if kind == "missing":
        del frame["id"]
    assert command_id(frame) == (cid if kind == "valid" else None)


# --- bodies ------------------------------------------------------------------------------

MAX_BYTES = 64
SHORT = st.text(min_size=1, max_size=64)
BODY_MUTATIONS = ["none"] * 4 + [
    "not_an_object",
    "v",
    "alg",
    "drop",
    "short_str",
    "length",
    "not_bytes",
    "empty_ct",
    "too_large",
    "plaintext_forbidden",
]


@st.composite
def bodies(draw: st.DrawFn, codec: Codec) -> tuple[Any, bool, dict[str, Any] | str]:
    """(raw body, plaintext allowed, the stored form it must become or the error code)."""
    binary = codec is MSGPACK

    def wire(raw: bytes) -> bytes | str:
        return raw if binary else base64.b64encode(raw).decode()

    plain = draw(st.booleans())
    mutation = draw(st.sampled_from(BODY_MUTATIONS))
    if plain and mutation in ("short_str", "length", "not_bytes", "empty_ct"):
        mutation = "none"
    event(f"{codec.name} {'plain' if plain else 'envelope'}: {mutation}")
    stored: dict[str, Any]
    if plain:
        text = draw(st.text(max_size=MAX_BYTES // 4))
        stored = {"v": 1, "alg": "none", "text": text}
        body: dict[str, Any] = dict(stored)
    else:
        stored = {
            "v": 1,
            "alg": "xchacha20poly1305",
            "device": draw(SHORT),
            "key_id": draw(SHORT),
            "nonce": draw(st.binary(min_size=24, max_size=24)),
            "ct": draw(st.binary(min_size=1, max_size=MAX_BYTES)),
            "sig": draw(st.binary(min_size=64, max_size=64)),
        }
        if draw(st.booleans()):
            stored["frank"] = draw(st.binary(min_size=32, max_size=32))
        body = {k: wire(v) if isinstance(v, bytes) else v for k, v in stored.items()}
    if draw(st.booleans()):  # clients may send fields the server does not keep
        body["extra"] = draw(st.text(max_size=5))
    allowed = True
    outcome: dict[str, Any] | str = stored
    if mutation == "not_an_object":
        return draw(st.sampled_from([[body], "body", None, 1])), allowed, "bad_request"
    if mutation == "v":
        body["v"] = draw(st.sampled_from([0, 2, "1", None, [1]]))
        outcome = "bad_request"
    elif mutation == "alg":
        body["alg"] = draw(st.sampled_from(["", "NONE", "aes", None, 1]))
        outcome = "bad_request"
    elif mutation == "drop":
        required = ["text"] if plain else ["device", "key_id", "nonce", "ct", "sig"]
        del body[draw(st.sampled_from(required))]
        outcome = "bad_request"
    elif mutation == "short_str":
        body[draw(st.sampled_from(["device", "key_id"]))] = draw(
            st.sampled_from(["", "x" * 65, 7, None])
        )
        outcome = "bad_request"
    elif mutation == "length":
        field, size = draw(st.sampled_from([("nonce", 24), ("sig", 64), ("frank", 32)]))
        wrong = draw(st.integers(0, 2 * size).filter(lambda n: n != size))
        body[field] = wire(bytes(wrong))
        outcome = "bad_request"
    elif mutation == "not_bytes":
        field = draw(st.sampled_from(["nonce", "ct", "sig", "frank"]))
        body[field] = draw(
            st.sampled_from(["not base64!", 5, ["x"]] if not binary else ["text", 5, ["x"]])
        )
        outcome = "bad_request"
    elif mutation == "empty_ct":
        body["ct"] = wire(b"")
        outcome = "bad_request"
    elif mutation == "too_large":
        if plain:
            body["text"] = "é" * (MAX_BYTES // 2 + 1)  # 33 characters, 66 bytes
        else:
            body["ct"] = wire(draw(st.binary(min_size=MAX_BYTES + 1, max_size=2 * MAX_BYTES)))
        outcome = "too_large"
    elif mutation == "plaintext_forbidden":
        allowed = False
        outcome = "forbidden" if plain else stored  # envelopes go anywhere
    return body, allowed, outcome


def check_body(codec: Codec, case: tuple[Any, bool, dict[str, Any] | str]) -> None:
    raw, allowed, outcome = case
    try:
        body = parse_body(raw, codec, plaintext_allowed=allowed, max_bytes=MAX_BYTES)
    except ProtocolError as err:
        assert err.code == outcome, (raw, err.message)
    else:
        assert body == outcome, raw


@given(bodies(JSON))
def test_parse_body_json(case: Any) -> None:
    check_body(JSON, case)


@given(bodies(MSGPACK))
def test_parse_body_msgpack(case: Any) -> None:
    check_body(MSGPACK, case)


@given(values)
def test_parse_body_refuses_anything_cleanly(raw: Any) -> None:
    for codec in (JSON, MSGPACK):
        try:
            body = parse_body(raw, codec, plaintext_allowed=True, max_bytes=1024)
        except ProtocolError as err:
            assert err.code in {"bad_request", "too_large", "forbidden"}
        else:
            assert body["v"] in (1, 2)  # 2: a v2 envelope (docs/e2ee/messages.md)


# --- channel names -----------------------------------------------------------------------

NAME_MUTATIONS = ["none"] * 3 + [
    "namespace",
    "no_colon",
    "empty_rest",
    "bad_char",
    "too_long",
    "longest",
    "not_a_string",
]


@st.composite
def names(draw: st.DrawFn) -> tuple[Any, bool]:
    name = draw(channel_names)
    mutation = draw(st.sampled_from(NAME_MUTATIONS))
    event(mutation)
    namespace, _, rest = name.partition(":")
    if mutation == "namespace":
        return draw(st.sampled_from(["rooms", "Room", "", "x", "alerts"])) + ":" + rest, False
    if mutation == "no_colon":
        return namespace + rest.replace(":", ""), False
    if mutation == "empty_rest":
        return namespace + ":", False
    if mutation == "bad_char":
        i = draw(st.integers(0, len(name)))
        bad = draw(st.sampled_from([" ", "/", "ü", "\n", "*", "#", "\x00"]))
        return name[:i] + bad + name[i:], False
    if mutation == "too_long":
        return name + "a" * (256 - len(name) + draw(st.integers(0, 10))), False
    if mutation == "longest":
        return name + "a" * (255 - len(name)), True
    if mutation == "not_a_string":
        return draw(st.sampled_from([None, 1, b"public:x", ["public:x"]])), False
    return name, True


@given(names())
def test_parse_channel_accepts_exactly_the_grammar(case: tuple[Any, bool]) -> None:
    name, valid = case
    try:
        ch = parse_channel(name)
    except ProtocolError as err:
        assert err.code == "bad_request"
        assert not valid, name
    else:
        assert valid, name
        assert ch.name == name and 1 <= len(name.encode()) <= 255
        assert ch.namespace in NAMESPACES and ch.rest and f"{ch.namespace}:{ch.rest}" == name


@given(st.text(max_size=300))
def test_parse_channel_refuses_any_text_cleanly(name: str) -> None:
    try:
        parse_channel(name)
    except ProtocolError as err:
        assert err.code == "bad_request"


def test_nested_bombs_are_refused_and_the_codecs_still_work() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested arrays
    with pytest.raises(UndecodableFrame):
        MSGPACK.decode(deep)
    with pytest.raises(UndecodableFrame):
        JSON.decode("[" * 100_000)
    with pytest.raises(UndecodableFrame):
        JSON.decode('{"a":' + "[" * 100_000 + "]" * 100_000 + "}")
    # a bomb leaves no state behind (recursion limit, buffers): the next frame decodes
    ping = {"id": 1, "op": "ping"}
    assert MSGPACK.decode(MSGPACK.encode(ping)) == ping
    assert JSON.decode(json.dumps(ping)) == ping
