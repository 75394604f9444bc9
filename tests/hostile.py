"""A hostile server for the tests: a WebSocket man-in-the-middle in front of a real node.

Everything a malicious operator (or whoever controls the server) can do to the wire, a test
can do here: rewrite the server's reply to a request, rewrite or drop a push, rewrite or drop
a client's request on its way in, and send a client a forged push. The honest clients
(`crypto.client_v2.SecureClient`) connect to `HostileProxy.url` instead of the node; the proxy
opens one upstream connection per client connection to the node's `/ws`, offering the
subprotocol the client chose (`rt.v1.json` or `rt.v1.msgpack`), and decodes and re-encodes
every frame with that codec (`realtime_safety.protocol.CODECS`).

    proxy.on_reply("keys.lookup", add_a_device, user="alice")   # alice's lookups only
    proxy.on_request("keys.share", keep_the_attackers_box)
    proxy.on_push("rekey", lambda push, hit: None, user="bob")  # None drops the frame
    proxy.drop("rekey", user="bob")                             # the same, shorter
    await proxy.inject("bob", {"push": "message", ...})         # a forged push (seq filled)
    proxy.requests("publish", user="alice")                     # what alice really sent

A rule is `fn(frame, hit) -> frame | None` (or a coroutine function returning that): it gets
the decoded frame (bytes as the connection's codec gives them: raw bytes for msgpack, base64
text for JSON; raw bytes put into a frame go out as base64 on JSON, as the node's own do)
and a `Hit` naming the connection (its user, known from the `auth` reply) and, for a reply,
the request it answers (the proxy remembers request ids per connection). Rules of one kind
run in the order they were added. Everything is recorded in `proxy.log`: requests as the
client sent them (before any rule: what the client really did), replies and pushes as
delivered (after the rules; `None` when dropped), forged pushes as `injected`.

The node's close code is passed on to the client. Injected message pushes without a `seq`
get the next one of that connection's channel, and the proxy shifts every later server `seq`
of that channel on that connection, so the client's own gap and duplicate checks
(`client.core.Client._on_push`) see an unbroken sequence (a dropped push leaves a gap, as a
dropping server would).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from conftest import Node, base_env
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from realtime_safety.protocol import CODECS, JSON, Codec, UndecodableFrame

Frame = dict[str, Any]
# The key log's signing seed the node is started with: the hostile operator holds it (it runs
# the server), so the attacks can sign tree heads of logs of their own making.
LOG_SEED = bytes(range(32))
Direction = Literal["request", "reply", "push", "injected"]


@dataclass
class Conn:
    """One client connection through the proxy."""

    id: int
    codec: Codec
    client: ServerConnection
    upstream: ClientConnection
    user: str | None = None  # from the `auth` reply
    pending: dict[Any, Frame] = field(default_factory=dict)  # request id -> request
    last_seq: dict[str, int] = field(default_factory=dict)  # channel -> last seq delivered
    shift: dict[str, int] = field(default_factory=dict)  # channel -> forged messages so far

    async def send(self, frame: Frame) -> None:
        await self.client.send(self.codec.encode(frame))


@dataclass(frozen=True)
class Hit:
    """Where a rule fires: the connection, and for a reply the request it answers."""

    conn: Conn
    request: Frame | None = None

    @property
    def user(self) -> str | None:
        return self.conn.user


Rule = Callable[[Frame, Hit], "Frame | Awaitable[Frame | None] | None"]


@dataclass(frozen=True)
class Seen:
    direction: Direction
    user: str | None
    frame: Frame | None  # as delivered (None: dropped); requests: as the client sent them
    original: Frame  # as it arrived at the proxy
    request: Frame | None = None  # for a reply

    @property
    def name(self) -> str | None:
        """The op of a request or reply, the kind of a push."""
        source = self.request if self.direction == "reply" else self.original
        value = (source or {}).get("op" if self.direction in ("request", "reply") else "push")
        return value if isinstance(value, str) else None


def mentions(value: object, needle: str | bytes) -> bool:
    """Whether `needle` occurs anywhere in a decoded frame (keys, values, nested)."""
    if isinstance(value, dict):
        return any(mentions(k, needle) or mentions(v, needle) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(mentions(v, needle) for v in value)
    if isinstance(value, str) and isinstance(needle, str):
        return needle in value
    if isinstance(value, bytes) and isinstance(needle, bytes):
        return needle in value
    return False


class HostileProxy:
    """A man-in-the-middle in front of `upstream` (a node's `ws://…/ws` URL)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.conns: list[Conn] = []
        self.log: list[Seen] = []
        self._rules: dict[tuple[str, str], list[tuple[str | None, Rule]]] = {}
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    # --- rules ------------------------------------------------------------------------

    def _add(self, kind: str, name: str, fn: Rule, user: str | None) -> None:
        self._rules.setdefault((kind, name), []).append((user, fn))

    def on_request(self, op: str, fn: Rule, *, user: str | None = None) -> None:
        """Rewrite (or drop: return None) a client's `op` request before the node sees it."""
        self._add("request", op, fn, user)

    def on_reply(self, op: str, fn: Rule, *, user: str | None = None) -> None:
        """Rewrite (or drop) the node's reply to an `op` request; `hit.request` is the
        request as the node received it."""
        self._add("reply", op, fn, user)

    def on_push(self, kind: str, fn: Rule, *, user: str | None = None) -> None:
        """Rewrite (or drop) pushes of this kind (`message`, `rekey`, …)."""
        self._add("push", kind, fn, user)

    def drop(self, kind: str, *, user: str | None = None) -> None:
        """Drop every push of this kind (to `user`'s connections only, if given)."""
        self.on_push(kind, lambda _frame, _hit: None, user=user)

    async def _apply(self, kind: str, name: object, frame: Frame, hit: Hit) -> Frame | None:
        if not isinstance(name, str):
            return frame
        current: Frame | None = frame
        for user, fn in self._rules.get((kind, name), []):
            if current is None:
                break
            if user is None or user == hit.user:
                result = fn(current, hit)
                current = await result if inspect.isawaitable(result) else result
        return current

    # --- forging ----------------------------------------------------------------------

    def connections(self, user: str) -> list[Conn]:
        return [c for c in self.conns if c.user == user]

    async def inject(self, target: Conn | str, frame: Frame) -> None:
        """Send a forged push to one connection, or to every connection of a user. Bytes are
        given raw (the JSON codec sends them as base64, as the node does); a message push
        without `seq` gets the next one of its channel on that connection."""
        targets = [target] if isinstance(target, Conn) else self.connections(target)
        assert targets, f"no connection of {target!r} through the proxy"
        for conn in targets:
            forged = dict(frame)
            channel = forged.get("channel")
            if forged.get("push") == "message" and "seq" not in forged and channel is not None:
                forged["seq"] = conn.last_seq.get(channel, 0) + 1
                conn.shift[channel] = conn.shift.get(channel, 0) + 1
            if forged.get("push") == "message" and channel is not None:
                conn.last_seq[channel] = max(conn.last_seq.get(channel, 0), forged["seq"])
            self.log.append(Seen("injected", conn.user, forged, forged))
            await conn.send(forged)

    # --- what was seen ----------------------------------------------------------------

    def mark(self) -> int:
        """A point in the log: pass it as `since` to see only what came after."""
        return len(self.log)

    def seen(
        self,
        direction: Direction,
        name: str | None = None,
        *,
        user: str | None = None,
        since: int = 0,
    ) -> list[Seen]:
        return [
            s
            for s in self.log[since:]
            if s.direction == direction
            and (name is None or s.name == name)
            and (user is None or s.user == user)
        ]

    def requests(
        self, op: str | None = None, *, user: str | None = None, since: int = 0
    ) -> list[Frame]:
        """Requests as the client sent them (before any rule)."""
        return [s.original for s in self.seen("request", op, user=user, since=since)]

    def replies(self, op: str | None = None, *, user: str | None = None) -> list[Frame]:
        """Replies as the client got them (after the rules; dropped ones left out)."""
        return [s.frame for s in self.seen("reply", op, user=user) if s.frame is not None]

    def pushes(self, kind: str | None = None, *, user: str | None = None) -> list[Frame]:
        """Pushes as the node sent them (before the rules) to `user`'s connections."""
        return [s.original for s in self.seen("push", kind, user=user)]

    def sent_mentioning(self, user: str, needle: str | bytes, *, since: int = 0) -> list[Frame]:
        """Requests of `user` in which `needle` (a device id, a key) occurs anywhere."""
        return [f for f in self.requests(user=user, since=since) if mentions(f, needle)]

    # --- running ----------------------------------------------------------------------

    async def start(self) -> HostileProxy:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            select_subprotocol=_select_subprotocol,
            max_size=None,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _handle(self, client: ServerConnection) -> None:
        proto = client.subprotocol
        codec = CODECS.get(proto or "", JSON)
        async with connect(
            self.upstream, subprotocols=[proto] if proto else None, max_size=None
        ) as upstream:
            conn = Conn(len(self.conns) + 1, codec, client, upstream)
            self.conns.append(conn)
            pumps = [
                asyncio.create_task(self._client_to_node(conn)),
                asyncio.create_task(self._node_to_client(conn)),
            ]
            self._tasks.update(pumps)
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
                    self._tasks.discard(task)
                # the node's close code reaches the client (4003, 4009: the client stops)
                code = upstream.close_code
                if code is None or code in (1005, 1006, 1015):  # not sendable in a close
                    code = 1000
                await client.close(code, upstream.close_reason or "")

    async def _client_to_node(self, conn: Conn) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in conn.client:
                try:
                    frame = conn.codec.decode(data)
                except UndecodableFrame:
                    await conn.upstream.send(data)  # the node answers that itself
                    continue
                out = await self._apply("request", frame.get("op"), frame, Hit(conn))
                self.log.append(Seen("request", conn.user, out, frame))
                if out is None:
                    continue
                if "id" in out:
                    conn.pending[out["id"]] = out
                await conn.upstream.send(conn.codec.encode(out))

    async def _node_to_client(self, conn: Conn) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in conn.upstream:
                frame = conn.codec.decode(data)
                if "push" in frame:
                    out = await self._push(conn, frame)
                else:
                    request = conn.pending.pop(frame.get("id"), None)
                    op = (request or {}).get("op")
                    if op == "auth" and frame.get("ok"):
                        conn.user = frame.get("user")
                    out = await self._apply("reply", op, frame, Hit(conn, request))
                    self.log.append(Seen("reply", conn.user, out, frame, request))
                if out is not None:
                    await conn.send(out)

    async def _push(self, conn: Conn, frame: Frame) -> Frame | None:
        out = await self._apply("push", frame.get("push"), frame, Hit(conn))
        channel = (out or {}).get("channel")
        if out is not None and out.get("push") == "message" and isinstance(channel, str):
            out = {**out, "seq": out["seq"] + conn.shift.get(channel, 0)}
            conn.last_seq[channel] = out["seq"]
        self.log.append(Seen("push", conn.user, out, frame))
        return out


def _select_subprotocol(
    _connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """Pass the client's choice through: the first subprotocol it offers that we speak."""
    return next((p for p in offered if p in CODECS), None)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One embedded-defaults node shared by a module's hostile-server tests (every test
    names its own users and rooms, so they do not see each other)."""
    env = base_env(Path(tmp_path_factory.mktemp("hostile")), RT_KT_SIGNING_KEY=LOG_SEED.hex())
    node = Node(env, "hostile")
    node.start()
    yield node
    node.stop()


@pytest.fixture
async def hostile(hostile_node: Node) -> AsyncIterator[HostileProxy]:
    """A fresh proxy (no rules, empty log) in front of the shared node: `hostile.url`."""
    proxy = await HostileProxy(hostile_node.url).start()
    yield proxy
    await proxy.stop()


def unique(name: str) -> str:
    """A user or room name no other test uses (the node is shared)."""
    return f"{name}-{uuid.uuid4().hex[:6]}"
