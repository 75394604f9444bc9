"""Property tests of the frame parsers: any input is a command, or a clean refusal."""

from __future__ import annotations

import base64
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.body import parse_body
from channels.names import parse_channel
from realtime.protocol import JSON, MSGPACK, ProtocolError, UndecodableFrame, command_id

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


@given(st.binary(max_size=256))
def test_msgpack_decode_never_raises_anything_else(data: bytes) -> None:
    try:
        assert isinstance(MSGPACK.decode(data), dict)
    except UndecodableFrame:
        pass


@given(st.text(max_size=256) | st.binary(max_size=256))
def test_json_decode_never_raises_anything_else(data: str | bytes) -> None:
    try:
        assert isinstance(JSON.decode(data), dict)
    except UndecodableFrame:
        pass


@given(st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_msgpack_round_trip(frame: dict[str, Any]) -> None:
    assert MSGPACK.decode(MSGPACK.encode(frame)) == frame


@given(st.binary(max_size=64))
def test_json_bytes_are_padded_base64(data: bytes) -> None:
    text = JSON.encode({"b": data})
    assert JSON.decode(text)["b"] == base64.b64encode(data).decode()
    assert JSON.bytes_field(JSON.decode(text)["b"]) == data


@given(st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_command_id_is_a_safe_integer_or_none(frame: dict[str, Any]) -> None:
    cid = command_id(frame)
    assert cid is None or (type(cid) is int and 0 <= cid <= 2**53 - 1)


@given(values)
def test_parse_body_accepts_or_refuses_cleanly(raw: Any) -> None:
    for codec in (JSON, MSGPACK):
        try:
            body = parse_body(raw, codec, plaintext_allowed=True, max_bytes=1024)
        except ProtocolError as err:
            assert err.code in {"bad_request", "too_large", "forbidden"}
        else:
            assert body["v"] == 1


@given(st.text(max_size=300))
def test_parse_channel_accepts_only_the_grammar(name: str) -> None:
    try:
        ch = parse_channel(name)
    except ProtocolError as err:
        assert err.code == "bad_request"
    else:
        assert ch.name == name and 1 <= len(name.encode()) <= 255
        assert ch.namespace in {"room", "public", "user", "alert"} and ch.rest


def test_msgpack_nested_bombs_are_refused() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested arrays
    with pytest.raises(UndecodableFrame):
        MSGPACK.decode(deep)
    with pytest.raises(UndecodableFrame):
        JSON.decode("[" * 100_000)
    assert msgpack.packb({"a": 1})  # the library itself still works
