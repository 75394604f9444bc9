"""A WebSocket client that can send anything (the hostile-input and resource-attack
scenarios): any bytes as a text or binary frame, and the server's close code when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import msgpack
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from .hostile import JSON_PROTO


class Closed(Exception):
    """The server closed: `code` is its close code, None when the TCP connection just ended."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code


class WireClient:
    """A WebSocket client on websockets' sans-I/O protocol: it sends any bytes as a text or
    binary frame (invalid UTF-8, oversize) and reports the server's close code."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proto: ClientProtocol
    ) -> None:
        self.reader, self.writer, self.proto = reader, writer, proto
        self.binary = proto.subprotocol == "rt.v1.msgpack"
        self._events: list[Frame] = []
        self.close_code: int | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int, subprotocol: str = JSON_PROTO) -> WireClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        proto = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/ws"),
            subprotocols=[Subprotocol(subprotocol)],
            max_size=None,
        )
        proto.send_request(proto.connect())
        writer.write(b"".join(proto.data_to_send()))
        client = cls(reader, writer, proto)
        while proto.state is State.CONNECTING:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            proto.receive_data(data)
        if proto.handshake_exc is not None:
            raise proto.handshake_exc
        client.binary = proto.subprotocol == "rt.v1.msgpack"
        client._collect()
        return client

    def _collect(self) -> None:
        for event in self.proto.events_received():
            if isinstance(event, Frame):
                self._events.append(event)
        out = self.proto.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(b"".join(out))  # pongs, the close reply

    def send(self, payload: bytes, *, text: bool) -> None:
        if self.proto.state is not State.OPEN:
            raise Closed(self.close_code)
        if text:
            self.proto.send_text(payload)
        else:
            self.proto.send_binary(payload)
        self.writer.write(b"".join(self.proto.data_to_send()))

    def send_frame(self, frame: dict[str, Any]) -> None:
        if self.binary:
            self.send(msgpack.packb(frame, use_bin_type=True), text=False)
        else:
            self.send(json.dumps(frame).encode(), text=True)

    async def next_frame(self, timeout: float) -> Frame:
        """The next text or binary frame; `Closed` when the connection ended instead."""
        async with asyncio.timeout(timeout):
            while True:
                while self._events:
                    event = self._events.pop(0)
                    if event.opcode is Opcode.CLOSE:
                        self.close_code = Close.parse(event.data).code if event.data else 1005
                        self.closed = True
                        raise Closed(self.close_code)
                    if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                        return event
                if self.closed:
                    raise Closed(self.close_code)
                try:
                    data = await self.reader.read(1 << 20)
                except ConnectionError:
                    data = b""
                if not data:
                    self.closed = True
                    raise Closed(self.close_code)
                self.proto.receive_data(data)
                self._collect()

    def decode(self, frame: Frame) -> dict[str, Any]:
        """A server frame, strictly: UTF-8 and JSON without NaN/Infinity, or msgpack."""
        if frame.opcode is Opcode.BINARY:
            obj = msgpack.unpackb(frame.data, raw=False, strict_map_key=False)
        else:
            obj = json.loads(bytes(frame.data).decode("utf-8"), parse_constant=_no_constant)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        return obj

    async def command(self, frame: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send a command, return its reply (pushes before it are skipped)."""
        self.send_frame(frame)
        while True:
            reply = self.decode(await self.next_frame(timeout))
            if reply.get("id") == frame["id"] and "ok" in reply:
                return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proto.state is State.OPEN:
                self.proto.send_close(1000)
                self.writer.write(b"".join(self.proto.data_to_send()))
        self.writer.close()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} in a reply")
