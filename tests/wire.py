"""A minimal outside client written only from docs/protocol-v1.md, for the protocol tests."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Opcode
from websockets.frames import Frame as WsFrame

from realtime_safety.loadtests.support import (
    stalled_subscriber as stalled_subscriber,  # for the tests
)
from realtime_safety.realtime.websocket import EXTENSION


def envelope(device: str = "d1", size: int = 16, *, b64: bool = False) -> dict[str, Any]:
    nonce, ct, sig = os.urandom(24), os.urandom(size), os.urandom(64)
    if b64:
        nonce, ct, sig = (base64.b64encode(x).decode() for x in (nonce, ct, sig))  # type: ignore[assignment]
    return {
        "v": 1,
        "alg": "xchacha20poly1305",
        "device": device,
        "key_id": "k1",
        "nonce": nonce,
        "ct": ct,
        "sig": sig,
    }


def plain(text: str) -> dict[str, Any]:
    return {"v": 1, "alg": "none", "text": text}


class Raw:
    def __init__(self, ws: ClientConnection, proto: str | None) -> None:
        self.ws = ws
        self.msgpack = proto == "rt.v1.msgpack"
        self.ids = itertools.count(1)
        self.pushes: list[dict[str, Any]] = []
        self.presence_log: list[dict[str, Any]] = []
        self._push_event = asyncio.Event()

    @classmethod
    async def open(
        cls, url: str, token: str | None = None, *, proto: str | None = "rt.v1.json", **kw: Any
    ) -> Raw:
        kw.setdefault("close_timeout", 1)  # a test client may leave pushes unread
        ws = await connect(url, subprotocols=[proto] if proto else None, **kw)
        raw = cls(ws, proto)
        if token is not None:
            reply = await raw.cmd("auth", token=token)
            assert reply["ok"], reply
        return raw

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(
            msgpack.packb(frame, use_bin_type=True) if self.msgpack else json.dumps(frame)
        )

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = (
            msgpack.unpackb(data, raw=False) if self.msgpack else json.loads(data)
        )
        return frame

    async def cmd(self, op: str, timeout: float = 10, **args: Any) -> dict[str, Any]:
        cid = next(self.ids)
        await self.send({"id": cid, "op": op, **args})
        while True:
            frame = await self.recv(timeout)
            if frame.get("id") == cid:
                return frame
            self.pushes.append(frame)

    async def ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = await self.cmd(op, **args)
        assert reply["ok"], reply
        return reply

    async def error(self, op: str, **args: Any) -> str:
        reply = await self.cmd(op, **args)
        assert reply["ok"] is False, reply
        assert set(reply["error"]) >= {"code", "message"}
        code: str = reply["error"]["code"]
        return code

    async def push(self, timeout: float = 5, *, presence: bool = False) -> dict[str, Any]:
        """The next push; `join`/`leave` pushes are set aside in `presence_log` unless
        `presence` is true."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.pushes:
                frame = self.pushes.pop(0)
            else:
                frame = await self.recv(max(0.0, deadline - asyncio.get_running_loop().time()))
            if presence or frame.get("push") not in ("join", "leave"):
                return frame
            self.presence_log.append(frame)

    async def nothing_before(
        self, sentinel: dict[str, Any], timeout: float = 5, *, presence: bool = False
    ) -> dict[str, Any]:
        """Prove that nothing arrived: the caller has just caused `sentinel` (a push that must
        arrive, and must arrive after anything the earlier step could have caused), so the
        next push has to be it. `sentinel` is matched field by field; the push is returned."""
        frame = await self.push(timeout, presence=presence)
        assert {k: frame.get(k) for k in sentinel} == sentinel, (
            f"expected the sentinel {sentinel}, got {frame}"
        )
        return frame

    async def quiet(self) -> None:
        """Prove that no push is waiting for this connection: a `ping`, whose reply leaves the
        server after every push already queued to this socket, comes back with nothing before
        it. Valid only where the push that must not come would already have been queued (on a
        single node, where fan-out is a direct call, once the causing command was answered)."""
        reply = await self.cmd("ping")
        assert reply["ok"], reply
        unexpected = [
            f for f in self.pushes if f.get("push") not in ("join", "leave")
        ]  # presence is set aside, as by push()
        assert not unexpected, f"unexpected frames {unexpected}"

    async def no_push(self, wait: float = 0.3, *, presence: bool = False) -> None:
        """Nothing within `wait` seconds. Weak (a late frame passes): prefer `nothing_before`
        or `quiet`; kept for callers that cannot cause a sentinel."""
        try:
            frame = await self.push(wait, presence=presence)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame}")

    async def close_code(self, timeout: float = 10) -> int | None:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        except ConnectionClosed:
            pass
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


async def sentinel(pub: Raw, channel: str) -> dict[str, Any]:
    """Publish a plaintext sentinel message on a `public:` channel through `pub`; the fields
    a subscriber's `nothing_before` will match it by. Fan-out keeps one order per broker
    topic, and join/leave/typing/delete pushes share the channel's topic with its messages."""
    cmid = f"sentinel-{uuid.uuid4().hex[:8]}"
    await pub.ok("publish", channel=channel, client_msg_id=cmid, body=plain("sentinel"))
    return {"push": "message", "channel": channel, "client_msg_id": cmid}


async def until(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    *,
    what: str = "the condition",
    interval: float = 0.05,
) -> Any:
    """Wait on a condition, not a clock: poll `check` (sync or async) until it returns
    something truthy and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def read_close_code(
    stalled: tuple[socket.socket, ClientProtocol], timeout: float = 20
) -> int | None:
    """Drain a stalled client's socket to the end; the close code the server sent, if any."""
    sock, proto = stalled
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = sock.recv(1 << 20)
        if not data:
            break
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, WsFrame) and event.opcode is Opcode.CLOSE:
                return Close.parse(event.data).code
    return None


def b64(value: Any) -> Any:
    """Bytes as padded base64, recursively: what a JSON client sends."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: b64(v) for k, v in value.items()}
    if isinstance(value, list):
        return [b64(v) for v in value]
    return value


class AppDevice:
    """A device with real keys, as an app would have, for tests that publish envelopes."""

    def __init__(self, device: str, key: bytes | None = None) -> None:
        from realtime_safety.crypto.e2ee import DeviceKeys, new_channel_key

        self.keys = DeviceKeys.generate(device)
        self.channel_key = key or new_channel_key()

    async def register(self, raw: Raw, user: str) -> None:
        args = self.keys.registration(user)
        await raw.ok("keys.register", **(args if raw.msgpack else b64(args)))

    def envelope(
        self, channel: str, client_msg_id: str, text: str = "secret", *, json: bool = True
    ) -> dict[str, Any]:
        from realtime_safety.crypto.e2ee import encrypt

        body = encrypt(self.keys, channel, client_msg_id, "k1", self.channel_key, text)
        return b64(body) if json else body


class RecordingSocket:
    """Both ways out of a connection, recorded in one list in the order bytes would leave."""

    def __init__(self) -> None:
        self.out: list[tuple[str, Any]] = []
        self.writable = True
        self.gone = False
        self.drained = asyncio.Event()  # the ASGI send waits for it, like a full buffer
        self.scope = {"extensions": {EXTENSION: {"writer": self}}}

    def can_write(self) -> bool:
        return self.writable

    def write_frame(self, wire: bytes) -> None:
        self.out.append(("direct", wire))

    async def send_text(self, data: str) -> None:
        await self.drained.wait()
        if self.gone:
            raise OSError("connection lost")
        self.out.append(("queued", data))

    def texts(self) -> list[int]:
        """The `n` of every frame, whichever way it left."""
        values = []
        for way, data in self.out:
            payload = data[2:].decode() if way == "direct" else data  # short frames: 2-byte head
            values.append(json.loads(payload)["n"])
        return values
