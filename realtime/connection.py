"""One WebSocket connection: auth and the command loop.

Commands of one connection run one at a time in arrival order. Replies and pushes go out in
order through its `Outbox` (realtime/outbox.py: straight to the socket, or in a bounded queue
behind a slow one; a consumer too far behind is closed with 4008). An idle connection has no
task of its own besides its handler. Incoming frames are bounded by the frame size limit and
the ASGI server, which reads one frame at a time. A frame that arrives while the command loop
waits is looked at in the socket's read callback first (`_arrived`): an SOS starts there, and
chat refused under overload is answered there, neither waiting for a turn of the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.websockets import WebSocket, WebSocketDisconnect

from realtime_safety.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_POLICY,
    CLOSE_UNDECODABLE,
    Codec,
    Frame,
    Identity,
    ProtocolError,
    Reply,
    UndecodableFrame,
    command_id,
    wire_frame,
)

from .access import SAFETY_OPS, reauthorize, safety_only
from .logs import CONNECTION
from .outbox import Outbox
from .ratelimit import CommandRate
from .websocket import arrival_hook

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("realtime.connection")

T = TypeVar("T")


class Connection:
    """The server side of one WebSocket: implements `protocol.Session` for the ops."""

    def __init__(self, ws: WebSocket, node: Node, codec: Codec) -> None:
        self.ws = ws
        self.node = node
        self.codec = codec
        self.id = secrets.token_urlsafe(12)
        self._identity: Identity | None = None
        self._started = False  # authenticated and registered: the features' `ended` is due
        limits = node.settings.limits
        self._outbox = Outbox(
            ws,
            codec.binary,
            limits.send_queue_frames,
            node.metrics,
            self._too_far_behind,
            f"ws-flush:{self.id}",
        )
        self._task: asyncio.Task[Any] | None = None
        self._context = contextvars.copy_context()
        self._receiving = False
        self._cancelled_by_close = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._closer: asyncio.Task[None] | None = None
        self._after_reply: list[Callable[[], None]] = []  # run right after the `ok` reply
        self._ops = node.ops  # every feature's ops (one table for all connections)
        self._sheddable = node.sheddable
        self._load = node.load
        self._rate = CommandRate(limits.rate_per_s, limits.rate_burst)
        self._urgent = node.urgent  # ops started as their frame arrives (`_arrived`)
        self._early: tuple[dict[str, Any], Awaitable[Reply] | None] | None = None
        arrivals = arrival_hook(ws.scope)
        if arrivals is not None:
            arrivals(self._arrived)
        self._expiry: asyncio.TimerHandle | None = None
        self._token_identity: Identity | None = None  # what the token says (roles included)
        self._banned: str | None = None  # globally banned: why (then only SAFETY_OPS run)

    @property
    def identity(self) -> Identity:
        """Who is calling; only read once authenticated (ops never run before)."""
        assert self._identity is not None
        return self._identity

    @property
    def restricted(self) -> bool:
        return self._banned is not None

    @property
    def user(self) -> str | None:
        return self._identity.user if self._identity is not None else None

    @property
    def queued(self) -> int:
        """Frames waiting behind a full socket."""
        return self._outbox.queued

    # --- outgoing ---------------------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        """A reply or a push for this connection only."""
        data = self.codec.encode(obj)
        if self._close_code is not None:
            return
        if self._outbox.direct():
            self._outbox.write(wire_frame(data, self.codec.binary))
        else:
            self._outbox.queue(data)

    def push(self, frame: Frame) -> None:
        """A push shared with other sockets: encoded and framed once for all of them."""
        if self._close_code is not None:
            return
        if self._outbox.direct():
            self._outbox.write(frame.wire(self.codec))
        else:
            self._outbox.queue(frame.encoded(self.codec))

    def _too_far_behind(self) -> None:
        self.close(CLOSE_POLICY, "slow consumer: too far behind")

    def close(self, code: int, reason: str = "") -> None:
        """Close after the frames already queued (at once for a slow consumer)."""
        if self._close_code is not None:
            return
        self._close_code = code
        self._close_reason = reason
        if self._receiving and self._task is not None:
            self._cancelled_by_close = True
            self._task.cancel()  # stop waiting for a frame: _receive returns None
        self._closer = asyncio.create_task(self._close_socket(), name=f"ws-close:{self.id}")

    async def _close_socket(self) -> None:
        """Flush what is queued (briefly; never for a slow consumer), then the close frame."""
        await self._outbox.drain(None if self._close_code == CLOSE_POLICY else 2)
        # The close frame waits behind what the socket already holds (bounded by the transport's
        # high-water mark); a peer that reads nothing for a ping timeout is dropped by the server.
        try:
            async with asyncio.timeout(self.node.settings.limits.ping_timeout_s):
                await self.ws.close(code=self._close_code or 1000, reason=self._close_reason)
        except (TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
            pass

    # --- the connection's life --------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        CONNECTION.set(self.id)  # on every log line of this task and those it starts
        self._context = contextvars.copy_context()  # and of the ops started as they arrive
        try:
            if await self._authenticate():
                await self._command_loop()
        except WebSocketDisconnect:
            pass
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            if self._started:
                await self.node.session_ended(self)
            self.node.unregister(self)
            self.close(1000)
            assert self._closer is not None
            try:
                async with asyncio.timeout(self.node.settings.limits.ping_timeout_s + 5):
                    await self._closer
            except Exception:
                self._closer.cancel()

    async def _receive(self) -> dict[str, Any] | None:
        """The next decoded frame; None once the connection is closing (`close` interrupts
        the wait by cancelling this task, which this absorbs)."""
        if self._close_code is not None:
            return None
        self._receiving = True
        try:
            message = await self.ws.receive()
        except asyncio.CancelledError:
            if not self._cancelled_by_close:
                raise
            self._cancelled_by_close = False
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return None
        finally:
            self._receiving = False
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        self.node.metrics.frames_in += 1
        decoded: dict[str, Any] | None = message.get("frame")  # started early: `_arrived`
        if decoded is not None:
            return decoded
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        try:
            return self.codec.decode(data if data is not None else b"")
        except UndecodableFrame as exc:
            self.close(CLOSE_UNDECODABLE, str(exc)[:120])
            return None

    def _reply_error(self, cid: int | None, err: ProtocolError) -> None:
        if cid is None:
            self.send({"push": "error", "error": err.to_error()})
        else:
            self.send({"id": cid, "ok": False, "error": err.to_error()})

    async def _authenticate(self) -> bool:
        try:
            async with asyncio.timeout(self.node.settings.limits.auth_timeout_s):
                frame = await self._receive()
        except TimeoutError:
            self.close(CLOSE_AUTH_TIMEOUT, "no auth in time")
            return False
        if frame is None:
            return False
        cid = command_id(frame)
        if frame.get("op") != "auth":
            self._reply_error(cid, ProtocolError("unauthorized", "the first command must be auth"))
            self.close(CLOSE_AUTH_FAILED, "auth required")
            return False
        try:
            if cid is None:
                raise ProtocolError("bad_request", "'id' must be a non-negative integer")
            identity = self.node.verifier.verify(frame.get("token"))
        except ProtocolError as err:
            self._reply_error(cid, err)
            self.close(CLOSE_AUTH_FAILED, err.message[:120])
            return False
        try:
            await self.bounded(self.node.moderation.check_issued(identity))
            banned = await self.bounded(self.node.moderation.banned(identity.user, None))
        except ProtocolError as err:
            self._reply_error(cid, err)
            self.close(
                CLOSE_AUTH_FAILED,
                err.message[:120] if err.code == "unauthorized" else "unavailable",
            )
            return False
        self._token_identity = identity
        if banned is not None:  # chat ends, safety does not: the owner's alert ops only
            self._banned = banned
            identity = safety_only(identity)
        # Checked and registered with no await in between: concurrent auths cannot overshoot.
        limit = self.node.settings.limits.max_connections_per_user
        if len(self.node.of_user(identity.user)) >= limit:
            log.debug("user %s over the connection limit (%d)", identity.user, limit)
            self._reply_error(
                cid, ProtocolError("too_large", f"more than {limit} connections for this user")
            )
            self.close(CLOSE_POLICY, "too many connections")
            return False
        self._set_identity(identity)
        self.node.register(self)
        self._started = True
        await self.node.session_started(self)
        reply = {
            "id": cid,
            "ok": True,
            "user": identity.user,
            "roles": sorted(identity.roles),
            "session": self.id,
            "node": self.node.settings.node_id,
        }
        if self._banned is not None:
            reply["banned"] = self._banned
        self.send(reply)
        return True

    def _set_identity(self, identity: Identity) -> None:
        self._identity = identity
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, identity.expires_at - time.time())
        self._expiry = loop.call_later(delay, self.close, CLOSE_AUTH_FAILED, "token expired")

    async def _command_loop(self) -> None:
        while True:
            frame = await self._receive()
            if frame is None:
                return
            early, self._early = self._early, None
            admitted = early is not None and early[0] is frame  # checked by `_arrived`
            cid = command_id(frame)
            try:
                if cid is None:
                    raise ProtocolError("bad_request", "'id' must be a non-negative integer")
                if not admitted:
                    self._rate_limit()
                op = frame.get("op")
                if not isinstance(op, str):
                    raise ProtocolError("bad_request", f"unknown op {type(op).__name__}")
                if self._banned is not None and op not in SAFETY_OPS:
                    await self._still_banned()
                handler = self._ops.get(op)
                if handler is not None:
                    if not admitted and op in self._sheddable and self._load.refuse():
                        raise self._shed()
                    started = early[1] if early is not None and admitted else None
                    if started is not None:
                        result = await self.bounded(started)
                    else:
                        result = await handler(self, frame)
                else:
                    own = _OWN_OPS.get(op)
                    if own is None:
                        raise ProtocolError("bad_request", f"unknown op {op[:64]!r}")
                    result = await own(self, frame)
            except ProtocolError as err:
                self._after_reply.clear()
                self._reply_error(cid, err)
                continue
            except Exception:
                self._after_reply.clear()
                log.exception("op %r failed", frame.get("op"))
                self._reply_error(cid, ProtocolError("internal", "internal error"))
                continue
            self.send({"id": cid, "ok": True, **result})
            if self._after_reply:
                then, self._after_reply = self._after_reply, []
                for callback in then:
                    callback()

    def _shed(self) -> ProtocolError:
        return ProtocolError(
            "unavailable",
            "the server is overloaded: retry later",
            retry_after_ms=self._load.retry_after_ms(),
        )

    def _rate_limit(self) -> None:
        refusal = self._rate.refuse()
        if refusal is None:
            return
        if self._rate.flooding:
            self.node.metrics.flood_closes += 1
            self.close(CLOSE_POLICY, "flooding")
        raise refusal

    def _arrived(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """The socket's read callback hands over each frame that arrives while the command loop
        waits for one: its next command. Two kinds are dealt with here, a turn of a busy event
        loop sooner (issue 21), after the checks the loop would make (command id, rate): an
        urgent op (`Feature.urgent`: an SOS) starts, and the loop answers it in order with the
        started call's outcome; while the node sheds load, chat work it refuses is answered
        at once (None: the loop never sees it), which also keeps each refusal cheap."""
        if not (self._receiving and self._started) or self._close_code is not None:
            return message
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        urgent = data is not None and self._urgent.mentioned(data)
        if data is None or self._banned is not None or not (urgent or self._load.overloaded):
            return message
        try:
            frame = self.codec.decode(data)
        except UndecodableFrame:
            return message
        cid, op = command_id(frame), frame.get("op")
        decoded = {"type": "websocket.receive", "frame": frame}
        if cid is None or not isinstance(op, str):
            return decoded
        start = self._urgent.ops.get(op) if urgent else None
        if start is None and not (op in self._sheddable and self._load.overloaded):
            return decoded
        try:
            self._rate_limit()
            if start is None and self._load.refuse():
                raise self._shed()
        except ProtocolError as err:
            self.node.metrics.frames_in += 1
            self._reply_error(cid, err)
            return None
        self._early = (frame, None)
        if start is not None:
            try:
                self._early = (frame, self._context.run(start, self, frame))
            except Exception:
                log.exception("starting %r failed", op)  # the loop runs the op's handler
        return decoded

    # --- the session's own ops and the Session interface -------------------------------

    async def _op_auth_again(self, frame: dict[str, Any]) -> Reply:
        raise ProtocolError("bad_request", "already authenticated: use refresh")

    async def _op_refresh(self, frame: dict[str, Any]) -> Reply:
        """A new token for the same user. What the session holds is authorised again against
        the new identity, through the checks the ops themselves use: subscriptions it may no
        longer make end (`unsubscribed`, reason `revoked`), and so do a moderator's watch
        patterns when the role is gone (`mod.unwatched`). All is checked before anything
        changes: if the store cannot answer, the refresh is `unavailable` and nothing moved."""
        token_identity = self.node.verifier.verify(frame.get("token"))
        if token_identity.user != self.user:
            raise ProtocolError("forbidden", "refresh must be for the same user")
        await self.bounded(self.node.moderation.check_issued(token_identity))
        identity = token_identity if self._banned is None else safety_only(token_identity)
        then = await self.bounded(reauthorize(self.node, self, identity))
        self._token_identity = token_identity
        self._set_identity(identity)
        await self.bounded(then())
        return {"expires_at": int(identity.expires_at), "roles": sorted(identity.roles)}

    async def _still_banned(self) -> None:
        """A globally banned session asks for more than its alert ops: `forbidden` while the
        ban holds; once it is lifted, the session is whole again (the token's roles)."""
        banned = await self.bounded(self.node.moderation.banned(self.identity.user, None))
        if banned is not None:
            raise ProtocolError("forbidden", f"banned: {banned} (only alert ops are open)")
        self._banned = None
        assert self._token_identity is not None
        self._identity = self._token_identity

    async def _op_ping(self, frame: dict[str, Any]) -> Reply:
        return {"ts": int(time.time() * 1000)}

    async def bounded(self, call: Awaitable[T]) -> T:
        """A backend call, bounded by the store timeout; a failure is `unavailable`."""
        return await self.node.channels.bounded("request", call)

    def after_reply(self, then: Callable[[], None]) -> None:
        self._after_reply.append(then)


# The session's own ops (every other op belongs to a feature: `Node.ops`).
_OWN_OPS: dict[str, Callable[[Connection, dict[str, Any]], Awaitable[Reply]]] = {
    "auth": Connection._op_auth_again,
    "refresh": Connection._op_refresh,
    "ping": Connection._op_ping,
}
