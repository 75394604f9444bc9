"""Issue 12, hostile input and resource attacks: the `loadtests faults` scenarios run small,
plus regression tests for what the fuzzing found. Behaviour is asserted, never timing figures."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from conftest import Node, token
from hypothesis import given, settings
from wire import Raw

from realtime_safety.loadtests.faults import badinput, exhaustion
from realtime_safety.loadtests.faults.hostile import DOCUMENTED_CLOSES, Hostile, hostile_frames
from realtime_safety.loadtests.faults.wireclient import Closed, WireClient
from realtime_safety.protocol import ERROR_CODES, JSON, MAX_NESTING, MSGPACK, UndecodableFrame

# --- the generator, through Hypothesis -----------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(hostile_frames())
def test_every_hostile_frame_decodes_to_a_command_or_is_refused_cleanly(h: Hostile) -> None:
    """The codecs never raise anything but UndecodableFrame on generated frames, and frames
    that must close with 1007 are refused by the codec (or by UTF-8/size checks before it)."""
    assert h.closes <= DOCUMENTED_CLOSES
    codec = MSGPACK if h.proto == "rt.v1.msgpack" else JSON
    if h.text:
        try:
            data: str | bytes = h.payload.decode()
        except UnicodeDecodeError:
            assert 1007 in h.closes and h.must_close  # the WebSocket layer closes 1007
            return
        if codec is MSGPACK:
            assert h.must_close and 1007 in h.closes
    else:
        data = h.payload
    if len(h.payload) > 128 * 1024:
        assert 1009 in h.closes  # the size check comes first (a deep one may also say 1007)
        return
    try:
        frame = codec.decode(data)
    except UndecodableFrame:
        assert 1007 in h.closes or h.kind == "pre-auth"
        return
    assert isinstance(frame, dict)
    if h.must_close and h.kind != "pre-auth":
        pytest.fail(f"{h.kind}: decoded although the server must close: {frame!r:.200}")


def test_nesting_limit_and_lone_surrogates_are_1007_in_the_codecs() -> None:
    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    for codec in (JSON, MSGPACK):
        assert codec.decode(codec.encode({"a": nested(MAX_NESTING - 1)}))
        with pytest.raises(UndecodableFrame):
            codec.decode(codec.encode({"a": nested(MAX_NESTING)}))
    for text in ['{"op":"\\ud800"}', '{"\\udc00":1}', '{"a":["x\\udfff"]}']:
        with pytest.raises(UndecodableFrame):
            JSON.decode(text)
        with pytest.raises(UndecodableFrame):
            JSON.decode(text.encode())
    assert JSON.decode('{"a":"\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a pair is fine
    assert JSON.decode('{"a":"\\\\ud800"}') == {"a": "\\ud800"}  # an escaped backslash


# --- regressions against a real node ------------------------------------------------------


async def test_lone_surrogates_close_1007_instead_of_internal_errors(single_node: Node) -> None:
    """Found by bad-input: `"\\ud800"` reached JWT and SQLite and came back as `internal`."""
    for frame in (
        '{"id": 5, "op": "refresh", "token": "\\ud800"}',
        '{"id": 6, "op": "alert.ack", "alert_id": "\\udfff\\ud800"}',
    ):
        raw = await Raw.open(single_node.url, token("alice"))
        await raw.ws.send(frame)
        assert await raw.close_code() == 1007


@pytest.mark.parametrize("proto", ["rt.v1.json", "rt.v1.msgpack"])
async def test_deep_nesting_closes_1007_and_the_node_keeps_serving(
    single_node: Node, proto: str
) -> None:
    """Found by bad-input: a 1,000-deep `op` made `repr()` raise RecursionError, which ended
    the connection with 1000 and an ASGI traceback."""
    raw = await Raw.open(single_node.url, token("alice"), proto=proto)
    if proto == "rt.v1.json":
        await raw.ws.send('{"id": 1, "op": ' + "[" * 1000 + "]" * 1000 + "}")
    else:
        await raw.ws.send(b"\x82\xa2id\x01\xa2op" + b"\x91" * 1000 + b"\xc0")
    assert await raw.close_code() == 1007
    fine = await Raw.open(single_node.url, token("alice"), proto=proto)
    assert (await fine.cmd("x", id_hint=[[[[1]]]]))["error"]["code"] == "bad_request"
    await fine.ok("ping")
    await fine.close()


async def test_unknown_op_error_is_bounded(single_node: Node) -> None:
    raw = await Raw.open(single_node.url, token("alice"))
    await raw.send({"id": 1, "op": "x" * 100_000})
    reply = await raw.recv()
    assert reply["error"]["code"] == "bad_request" and len(reply["error"]["message"]) < 200
    await raw.send({"id": 2, "op": list(range(10_000))})
    reply = await raw.recv()
    assert reply["error"]["code"] == "bad_request" and len(reply["error"]["message"]) < 200
    await raw.close()


async def test_invalid_utf8_text_closes_1007_without_an_error_log(single_node: Node) -> None:
    before = single_node.log().count("Invalid UTF-8")
    client = await WireClient.open(single_node.port)
    await client.command({"id": 1, "op": "auth", "token": token("alice")})
    client.send(b'{"id":2,"op":"\xff"}', text=True)
    with pytest.raises(Closed) as closed:
        await client.next_frame(10)
    assert closed.value.code == 1007
    client.close()
    assert single_node.log().count("Invalid UTF-8") == before


# --- the scenarios, small -----------------------------------------------------------------


def test_bad_input_scenario_small() -> None:
    result = badinput.bad_input(0.02, workers=8)
    assert result.sent == 2000
    assert result.extra["node_alive"]
    assert result.extra["violations"] == 0, result.notes
    assert set(result.extra["error_codes"]) <= ERROR_CODES - {"internal"}
    assert {int(c) for c in result.extra["close_codes"]} <= DOCUMENTED_CLOSES
    assert {"1007", "1009", "4003"} <= set(result.extra["close_codes"])
    assert result.extra["canary_pings"] > 0


def test_conn_flood_scenario_small() -> None:
    result = exhaustion.conn_flood(0.05, limit=10)  # 100 attempts by one user
    assert result.extra["accepted"] == 10
    refused = result.sent - 10
    assert result.extra["outcome"]["refused too_large"] == refused
    assert result.extra["outcome"]["close 4008"] == refused
    assert result.extra["other_user_ok"] and result.extra["held_still_work"]
    assert result.extra["reconnect_after_release"]
    assert result.ok


def test_slowloris_scenario_small() -> None:
    result = exhaustion.slowloris(0.02, handshake_s=1.0, auth_s=1.0)  # 3 x 6 sockets
    assert result.extra["real_client_ok"]
    assert result.extra["outcome"].get("held", 0) == 0
    assert result.extra["outcome"]["close 4001"] == 6
    assert result.extra["dropped"] == result.sent
    assert result.extra["open_files_back"]
    assert result.ok


def test_never_reads_scenario_small() -> None:
    result = exhaustion.never_reads(0.05, ping_s=1.0)  # 5 readers, 300 messages of 4 KB
    ends = result.extra["reader_ends"]
    assert set(ends) <= {"close 4008", "close 1011", "dropped", "silent"}, ends
    assert sum(ends.values()) == 5
    assert result.extra["readers_gone"]
    assert result.ok


def _response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body), however TCP splits it."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += s.recv(4096)
    return head + b"\r\n\r\n" + body


async def test_silent_socket_is_closed_by_the_handshake_timeout(node_factory: Any) -> None:
    node: Node = node_factory("hs", RT_HANDSHAKE_TIMEOUT_S="0.5")
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never finished
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    writer.close()
    # A complete request is not affected, nor is a keep-alive connection between requests.
    with socket.create_connection(("127.0.0.1", node.port), 5) as s:
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _response(s).startswith(b"HTTP/1.1 200")
    raw = await Raw.open(node.url, token("alice"))
    await raw.ok("ping")
    await raw.close()


async def test_per_user_connection_limit(node_factory: Any) -> None:
    node: Node = node_factory("lim", RT_MAX_CONNECTIONS_PER_USER="3")
    held = [await Raw.open(node.url, token("alice")) for _ in range(3)]
    extra = await Raw.open(node.url, proto="rt.v1.msgpack")
    reply = await extra.cmd("auth", token=token("alice"))
    assert reply["ok"] is False and reply["error"]["code"] == "too_large"
    assert await extra.close_code() == 4008
    bob = await Raw.open(node.url, token("bob"))  # other users are not affected
    await bob.ok("ping")
    await held.pop().close()
    again: Raw | None = None
    for _ in range(100):  # the slot frees once the node has seen the close
        candidate = await Raw.open(node.url)
        if (await candidate.cmd("auth", token=token("alice")))["ok"]:
            again = candidate
            break
        await asyncio.sleep(0.05)
    assert again is not None
    for r in [*held, bob, again]:
        await r.close()
