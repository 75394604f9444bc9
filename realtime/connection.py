"""One WebSocket connection: auth, the command loop, and its bounded outgoing queue.

Commands of one connection run one at a time in arrival order. Replies and pushes are
written straight to the socket while it takes them (`rt.direct`, realtime/websocket.py: a
shared push is framed once for every socket); behind a full socket they wait, in order, in a
deque of at most `send_queue_frames` that a flusher task sends through ASGI. A consumer that
falls further behind is closed with 4008 instead of growing memory. An idle connection has no
task of its own besides its handler. Incoming frames are bounded by the frame size limit and
the ASGI server, which reads one frame at a time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from starlette.websockets import WebSocket, WebSocketDisconnect

from realtime_safety.channels.acl import Action
from realtime_safety.channels.body import ALG_ENVELOPE, parse_body
from realtime_safety.channels.hub import Frame, message_frame, message_item
from realtime_safety.channels.names import ChannelName, parse_channel
from realtime_safety.channels.service import Replay
from realtime_safety.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_AUTH_TIMEOUT,
    CLOSE_BANNED,
    CLOSE_POLICY,
    CLOSE_UNDECODABLE,
    Codec,
    Identity,
    ProtocolError,
    UndecodableFrame,
    arg_int,
    arg_str,
    command_id,
    require_str,
    wire_frame,
)
from realtime_safety.storage import Report

from .logs import CONNECTION
from .websocket import direct_writer

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("realtime.connection")

Reply = dict[str, Any]
T = TypeVar("T")


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if allowed, else seconds until a token is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(slots=True)
class Subscription:
    last_seq: int = 0
    # While the subscribe command replays history, live pushes wait here (bounded).
    pending: list[tuple[int, Frame]] | None = field(default_factory=list)


class Connection:
    # op -> handler method name (one table for all connections)
    _OPS: ClassVar[dict[str, str]] = {
        "auth": "_op_auth_again",
        "refresh": "_op_refresh",
        "ping": "_op_ping",
        "subscribe": "_op_subscribe",
        "unsubscribe": "_op_unsubscribe",
        "publish": "_op_publish",
        "history": "_op_history",
        "typing": "_op_typing",
        "read": "_op_read",
        "presence": "_op_presence",
        "presence.invisible": "_op_invisible",
        "keys.register": "_op_keys_register",
        "keys.lookup": "_op_keys_lookup",
        "keys.share": "_op_keys_share",
        "keys.fetch": "_op_keys_fetch",
        "members": "_op_members",
        "report": "_op_report",
        "mod.watch": "_op_mod_watch",
        "mod.unwatch": "_op_mod_unwatch",
        "mod.delete": "_op_mod_delete",
        "mod.ban": "_op_mod_ban",
        "mod.unban": "_op_mod_unban",
        "mod.reports": "_op_mod_reports",
        "mod.resolve_report": "_op_mod_resolve_report",
        "mod.audit": "_op_mod_audit",
        "mod.alerts": "_op_mod_alerts",
        "alert.trigger": "_op_alert_trigger",
        "alert.location": "_op_alert_location",
        "alert.ack": "_op_alert_ack",
        "alert.resolve": "_op_alert_resolve",
        "alert.status": "_op_alert_status",
        "location.share": "_op_location_share",
    }

    def __init__(self, ws: WebSocket, node: Node, codec: Codec) -> None:
        self.ws = ws
        self.node = node
        self.codec = codec
        self.session = secrets.token_urlsafe(12)
        self.identity: Identity | None = None
        self.subs: dict[str, Subscription] = {}
        limits = node.settings.limits
        self._max_queue = limits.send_queue_frames
        self._out: deque[str | bytes] | None = None  # only behind a slow socket
        self._direct = direct_writer(ws.scope)
        self._flusher: asyncio.Task[None] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._receiving = False
        self._cancelled_by_close = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._closer: asyncio.Task[None] | None = None
        # Set by subscribe: the replay to push right after its reply.
        self._after_reply: tuple[str, Subscription, Replay] | None = None
        self._bucket = TokenBucket(limits.rate_per_s, limits.rate_burst)
        self._rejected = 0
        self._rejected_since = 0.0
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def user(self) -> str:
        assert self.identity is not None
        return self.identity.user

    @property
    def queued(self) -> int:
        """Frames waiting behind a full socket."""
        return len(self._out) if self._out is not None else 0

    # --- outgoing ---------------------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        """A reply or a push for this connection only."""
        data = self.codec.encode(obj)
        if self._direct_ok():
            self._write(wire_frame(data, self.codec.binary))
        else:
            self._queue(data)

    def push(self, frame: Frame) -> None:
        """A push shared with other sockets: encoded and framed once for all of them."""
        if self._direct_ok():
            self._write(frame.wire(self.codec))
        else:
            self._queue(frame.encoded(self.codec))

    def _direct_ok(self) -> bool:
        """Whether a frame can go straight to the socket: nothing queued before it, not
        closing, and the transport takes it without waiting."""
        direct = self._direct
        return (
            direct is not None and not self._out and self._close_code is None and direct.can_write()
        )

    def _write(self, wire: bytes) -> None:
        assert self._direct is not None
        self._direct.write_frame(wire)
        self.node.metrics.frames_out += 1

    def _queue(self, data: str | bytes) -> None:
        """Behind a slow socket: wait in the bounded queue for the flusher."""
        if self._close_code is not None:
            return
        if self._out is not None and len(self._out) >= self._max_queue:
            self.node.metrics.slow_consumers += 1
            self.close(CLOSE_POLICY, "slow consumer: too far behind")
            return
        if self._out is None:
            self._out = deque()
        self._out.append(data)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name=f"ws-flush:{self.session}")

    async def _flush(self) -> None:
        """Send the queue in order through ASGI, which waits while the socket's buffer is
        full. The frame being sent stays at the head of the queue, so no direct write can
        overtake it. Runs only while there is a queue."""
        ws = self.ws
        binary = self.codec.binary
        out = self._out
        assert out is not None
        try:
            while out:
                data = out[0]
                if binary:
                    await ws.send_bytes(data)  # type: ignore[arg-type]
                else:
                    await ws.send_text(data)  # type: ignore[arg-type]
                out.popleft()
                self.node.metrics.frames_out += 1
        except (WebSocketDisconnect, OSError, RuntimeError):
            out.clear()  # the socket is gone; its handler cleans up
        finally:
            self._flusher = None
            self._out = None

    def close(self, code: int, reason: str = "") -> None:
        """Close after the frames already queued (at once for a slow consumer)."""
        if self._close_code is not None:
            return
        self._close_code = code
        self._close_reason = reason
        if self._receiving and self._task is not None:
            self._cancelled_by_close = True
            self._task.cancel()  # stop waiting for a frame: _receive returns None
        self._closer = asyncio.create_task(self._close_socket(), name=f"ws-close:{self.session}")

    async def _close_socket(self) -> None:
        """Flush what is queued (briefly; never for a slow consumer), then the close frame."""
        flusher = self._flusher
        if flusher is not None:
            if self._close_code != CLOSE_POLICY:
                try:
                    async with asyncio.timeout(2):
                        await asyncio.shield(flusher)
                except TimeoutError:
                    pass
            flusher.cancel()
        # The close frame waits behind what the socket already holds (bounded by the transport's
        # high-water mark); a peer that reads nothing for a ping timeout is dropped by the server.
        try:
            async with asyncio.timeout(self.node.settings.limits.ping_timeout_s):
                await self.ws.close(code=self._close_code or 1000, reason=self._close_reason)
        except (TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
            pass

    # --- hub callbacks (run on the event loop, never block) ----------------------------

    def deliver(self, channel: str, seq: int, frame: Frame) -> None:
        sub = self.subs.get(channel)
        if sub is None:
            return
        if sub.pending is not None:
            if len(sub.pending) >= self._max_queue:
                self.close(CLOSE_POLICY, "slow consumer: too far behind")
                return
            sub.pending.append((seq, frame))
            return
        if seq <= sub.last_seq:
            return
        sub.last_seq = seq
        self.push(frame)

    def deliver_event(self, channel: str, frame: Frame) -> None:
        if channel in self.subs:
            self.push(frame)

    def kick(self, channel: str, reason: str, *, push: str = "unsubscribed") -> None:
        """Drop a subscription the user is no longer entitled to (removed: `unsubscribed`;
        banned: `kicked`)."""
        if self.subs.pop(channel, None) is not None:
            self.node.hub.remove(channel, self)
            self.node.spawn(self.node.presence.remove(channel, self.user), "presence-remove")
            self.send({"push": push, "channel": channel, "reason": reason})

    # --- the connection's life --------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        CONNECTION.set(self.session)  # on every log line of this task and those it starts
        try:
            if await self._authenticate():
                await self._command_loop()
        except WebSocketDisconnect:
            pass
        finally:
            for channel in self.subs:
                self.node.hub.remove(channel, self)
            if self.identity is not None and self in self.node.connections:
                gone = [*self.subs, f"user:{self.user}"]
                await asyncio.gather(*(self.node.presence.remove(ch, self.user) for ch in gone))
            self.subs.clear()
            if self._expiry is not None:
                self._expiry.cancel()
            self.node.unregister(self)
            self.node.moderation.forget(self)
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
        data = message.get("text")
        if data is None:
            data = message.get("bytes")
        self.node.metrics.frames_in += 1
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
            banned = await self._bounded(self.node.moderation.banned(identity.user, None))
        except ProtocolError as err:
            self._reply_error(cid, err)
            self.close(CLOSE_AUTH_FAILED, "unavailable")
            return False
        if banned is not None:
            self._reply_error(cid, ProtocolError("forbidden", f"banned: {banned}"))
            self.close(CLOSE_BANNED, "banned")
            return False
        # Checked and registered with no await in between: concurrent auths cannot overshoot.
        limit = self.node.settings.limits.max_connections_per_user
        if len(self.node.connections_of(identity.user)) >= limit:
            log.debug("user %s over the connection limit (%d)", identity.user, limit)
            self._reply_error(
                cid, ProtocolError("too_large", f"more than {limit} connections for this user")
            )
            self.close(CLOSE_POLICY, "too many connections")
            return False
        self._set_identity(identity)
        self.node.register(self)
        await self.node.presence.add(f"user:{identity.user}", identity.user)  # online status
        self.send(
            {
                "id": cid,
                "ok": True,
                "user": identity.user,
                "roles": sorted(identity.roles),
                "session": self.session,
                "node": self.node.settings.node_id,
            }
        )
        return True

    def _set_identity(self, identity: Identity) -> None:
        self.identity = identity
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
            cid = command_id(frame)
            try:
                if cid is None:
                    raise ProtocolError("bad_request", "'id' must be a non-negative integer")
                self._rate_limit()
                op = frame.get("op")
                name = self._OPS.get(op) if isinstance(op, str) else None
                if name is None:
                    shown = repr(op[:64]) if isinstance(op, str) else type(op).__name__
                    raise ProtocolError("bad_request", f"unknown op {shown}")
                handler: Callable[[dict[str, Any]], Awaitable[Reply]] = getattr(self, name)
                result = await handler(frame)
            except ProtocolError as err:
                self._reply_error(cid, err)
                continue
            except Exception:
                log.exception("op %r failed", frame.get("op"))
                self._reply_error(cid, ProtocolError("internal", "internal error"))
                continue
            self.send({"id": cid, "ok": True, **result})
            self._flush_after_reply()

    def _rate_limit(self) -> None:
        """Over the rate: `rate_limited`. More than `rate_burst` rejections within 10 s
        (a client that ignores `retry_after_ms`): flooding, close 4008."""
        wait = self._bucket.take()
        if not wait:
            return
        now = time.monotonic()
        if now - self._rejected_since > 10.0:
            self._rejected_since, self._rejected = now, 0
        self._rejected += 1
        if self._rejected > self.node.settings.limits.rate_burst:
            self.node.metrics.flood_closes += 1
            self.close(CLOSE_POLICY, "flooding")
        raise ProtocolError(
            "rate_limited", "too many commands", retry_after_ms=int(wait * 1000) + 1
        )

    # --- ops --------------------------------------------------------------------------

    async def _op_auth_again(self, frame: dict[str, Any]) -> Reply:
        raise ProtocolError("bad_request", "already authenticated: use refresh")

    async def _op_refresh(self, frame: dict[str, Any]) -> Reply:
        identity = self.node.verifier.verify(frame.get("token"))
        if identity.user != self.user:
            raise ProtocolError("forbidden", "refresh must be for the same user")
        self._set_identity(identity)
        return {"expires_at": int(identity.expires_at)}

    async def _op_ping(self, frame: dict[str, Any]) -> Reply:
        return {"ts": int(time.time() * 1000)}

    def _channel(self, frame: dict[str, Any]) -> ChannelName:
        return parse_channel(frame.get("channel"))

    async def _op_subscribe(self, frame: dict[str, Any]) -> Reply:
        ch = self._channel(frame)
        since = arg_int(frame, "since_seq")
        assert self.identity is not None
        await self.node.acl.check(self.identity, ch, Action.SUBSCRIBE)
        if ch.name in self.subs:
            raise ProtocolError("conflict", f"already subscribed to {ch.name}")
        if len(self.subs) >= self.node.settings.limits.max_subscriptions:
            raise ProtocolError("too_large", "subscription limit reached")
        sub = self.subs[ch.name] = Subscription()
        try:
            await self.node.hub.add(ch.name, self)
            replay = await self.node.channels.replay(ch.name, since)
        except BaseException:
            if self.subs.pop(ch.name, None) is not None:
                self.node.hub.remove(ch.name, self)
            raise
        self._after_reply = (ch.name, sub, replay)
        await self.node.presence.add(ch.name, self.user)
        return {"channel": ch.name, "last_seq": replay.last_seq, "recovered": replay.recovered}

    def _flush_after_reply(self) -> None:
        """After a subscribe reply: the replay, then live pushes held back meanwhile."""
        if self._after_reply is None:
            return
        channel, sub, replay = self._after_reply
        self._after_reply = None
        if self.subs.get(channel) is not sub:
            return
        for m in replay.messages:
            self.push(message_frame(m))
        sub.last_seq = replay.last_seq
        pending, sub.pending = sub.pending or [], None
        for seq, live in pending:
            if seq > sub.last_seq:
                sub.last_seq = seq
                self.push(live)

    async def _op_unsubscribe(self, frame: dict[str, Any]) -> Reply:
        ch = self._channel(frame)
        if self.subs.pop(ch.name, None) is not None:
            self.node.hub.remove(ch.name, self)
            await self.node.presence.remove(ch.name, self.user)
        return {}

    async def _op_publish(self, frame: dict[str, Any]) -> Reply:
        start = time.perf_counter()
        ch = self._channel(frame)
        cmid = require_str(frame, "client_msg_id", max_len=64)
        limits = self.node.settings.limits
        body = parse_body(
            frame.get("body"),
            self.codec,
            plaintext_allowed=ch.namespace in self.node.settings.plaintext_namespaces,
            max_bytes=limits.max_body_bytes,
        )
        assert self.identity is not None
        await self.node.acl.check(self.identity, ch, Action.PUBLISH)
        if body["alg"] == ALG_ENVELOPE:
            await self._bounded(self.node.keys.verify_envelope(self.user, ch.name, cmid, body))
        device = body.get("device") or self.identity.device
        appended = await self.node.channels.publish(ch.name, self.user, device, cmid, body)
        self.node.metrics.published += 0 if appended.duplicate else 1
        reply: Reply = {"seq": appended.message.seq, "ts": appended.message.ts}
        if appended.duplicate:
            reply["duplicate"] = True
        self.node.metrics.publish_seconds.observe(time.perf_counter() - start)
        return reply

    async def _op_history(self, frame: dict[str, Any]) -> Reply:
        ch = self._channel(frame)
        before = arg_int(frame, "before_seq", minimum=1)
        limit = arg_int(frame, "limit", minimum=1, maximum=200) or 50
        assert self.identity is not None
        await self.node.acl.check(self.identity, ch, Action.HISTORY)
        messages, has_more = await self.node.channels.history(ch.name, before, limit)
        read_seq = await self.node.channels.read_marker(ch.name, self.user)
        return {
            "channel": ch.name,
            "messages": [message_item(m) for m in messages],
            "has_more": has_more,
            "read_seq": read_seq,
        }

    async def _op_typing(self, frame: dict[str, Any]) -> Reply:
        ch = self._channel(frame)
        assert self.identity is not None
        await self.node.acl.check(self.identity, ch, Action.TYPING)
        wait = self.node.typing_allowed(self.user, ch.name)
        if wait:
            raise ProtocolError(
                "rate_limited",
                "one typing notice per second per user and channel",
                retry_after_ms=int(wait * 1000) + 1,
            )
        await self.node.channels.typing(ch.name, self.user)
        return {}

    async def _op_read(self, frame: dict[str, Any]) -> Reply:
        ch = self._channel(frame)
        seq = arg_int(frame, "seq")
        if seq is None:
            raise ProtocolError("bad_request", "'seq' is required")
        assert self.identity is not None
        await self.node.acl.check(self.identity, ch, Action.READ)
        stored = await self.node.channels.mark_read(ch.name, self.user, seq)
        return {"channel": ch.name, "read_seq": stored}

    async def _op_presence(self, frame: dict[str, Any]) -> Reply:
        """Members of a channel, paged (`cursor` from the previous reply, 0 = done). On
        `user:<id>` any user may ask whether <id> is online, unless <id> is invisible."""
        ch = self._channel(frame)
        cursor = arg_int(frame, "cursor") or 0
        limit = arg_int(frame, "limit", minimum=1, maximum=1000) or 100
        assert self.identity is not None
        if ch.namespace == "user":
            if ch.rest != self.user and await self._bounded(
                self.node.presence.store.is_invisible(ch.rest)
            ):
                return {"channel": ch.name, "members": [], "cursor": 0, "total": 0}
        else:
            await self.node.acl.check(self.identity, ch, Action.SUBSCRIBE)
        page = await self._bounded(self.node.presence.members(ch.name, cursor, limit))
        members = [{"user": user, "since": since} for user, since in page.members]
        return {
            "channel": ch.name,
            "members": members,
            "cursor": page.cursor,
            "total": page.total,
        }

    async def _op_invisible(self, frame: dict[str, Any]) -> Reply:
        invisible = frame.get("invisible")
        if not isinstance(invisible, bool):
            raise ProtocolError("bad_request", "'invisible' must be true or false")
        await self._bounded(self.node.presence.store.set_invisible(self.user, invisible))
        return {"invisible": invisible}

    async def _bounded(self, call: Awaitable[T]) -> T:
        """A backend call, bounded by the store timeout; a failure is `unavailable`."""
        return await self.node.channels.bounded("request", call)

    # --- keys and reports (PROTOCOL.md sections 5 and 8) -------------------------------

    async def _op_keys_register(self, frame: dict[str, Any]) -> Reply:
        device = await self._bounded(self.node.keys.register(self.user, frame, self.codec))
        return {"device": device.device}

    async def _op_keys_lookup(self, frame: dict[str, Any]) -> Reply:
        devices = await self._bounded(self.node.keys.lookup(frame.get("users")))
        return {
            "devices": [
                {
                    "user": d.user,
                    "device": d.device,
                    "identity_key": d.identity_key,
                    "signing_key": d.signing_key,
                }
                for d in devices
            ]
        }

    async def _op_keys_share(self, frame: dict[str, Any]) -> Reply:
        """Hand a channel key to member devices (sealed boxes); every recipient device must
        belong to a user entitled to the channel."""
        ch = self._channel(frame)
        key_id = require_str(frame, "key_id", max_len=64)
        sealed = self.node.keys.sealed_map(frame.get("sealed"), self.codec)
        assert self.identity is not None
        await self.node.acl.check(self.identity, ch, Action.PUBLISH)
        for device_id in sealed:
            device = await self._bounded(self.node.keys.device(device_id))
            if device is None:
                raise ProtocolError("not_found", f"device {device_id!r} is not registered")
            owner = Identity(user=device.user, roles=frozenset({"user"}), expires_at=0)
            try:
                await self.node.acl.check(owner, ch, Action.HISTORY)
            except ProtocolError:
                raise ProtocolError(
                    "forbidden", f"device {device_id!r} is not a member's device"
                ) from None
        conflicts = await self._bounded(
            self.node.store.keys.share(
                ch.name, key_id, sealed, self.identity.device, int(time.time() * 1000)
            )
        )
        return {"channel": ch.name, "key_id": key_id, "conflicts": conflicts}

    async def _op_keys_fetch(self, frame: dict[str, Any]) -> Reply:
        ch = self._channel(frame)
        key_id = arg_str(frame, "key_id", max_len=64, required=False)
        assert self.identity is not None
        device_id = arg_str(frame, "device", max_len=64, required=False) or self.identity.device
        if device_id is None:
            raise ProtocolError("bad_request", "'device' is required (or a token device claim)")
        await self.node.acl.check(self.identity, ch, Action.HISTORY)
        device = await self._bounded(self.node.keys.device(device_id))
        if device is None or device.user != self.user:
            raise ProtocolError("forbidden", f"device {device_id!r} is not yours")
        found = await self._bounded(self.node.store.keys.fetch(ch.name, device_id, key_id))
        if found is None:
            raise ProtocolError("not_found", "no key shared with this device for that channel")
        return {"channel": ch.name, "key_id": found[0], "sealed": found[1]}

    async def _op_members(self, frame: dict[str, Any]) -> Reply:
        """Members of a room (to share keys with them), paged by `after`."""
        ch = self._channel(frame)
        if ch.namespace != "room":
            raise ProtocolError("bad_request", "only room: channels have a member list")
        after = arg_str(frame, "after", max_len=128, required=False)
        limit = arg_int(frame, "limit", minimum=1, maximum=1000) or 1000
        assert self.identity is not None
        await self.node.acl.check(self.identity, ch, Action.HISTORY)
        members = await self.node.channels.members(ch.name, limit, after)
        return {
            "channel": ch.name,
            "members": members,
            "next": members[-1] if len(members) == limit else None,
        }

    async def _op_report(self, frame: dict[str, Any]) -> Reply:
        """A member reports a message; with `franking` the plaintext they reveal is checked to
        be exactly what the sender sent, or the report is refused."""
        ch = self._channel(frame)
        seq = arg_int(frame, "seq", minimum=1)
        if seq is None:
            raise ProtocolError("bad_request", "'seq' is required")
        reason = require_str(frame, "reason", max_len=500)
        assert self.identity is not None
        await self.node.acl.check(self.identity, ch, Action.HISTORY)
        found = await self._bounded(self.node.store.messages.after(ch.name, seq - 1, 1))
        if not found or found[0].seq != seq:
            raise ProtocolError("not_found", f"no message {seq} in {ch.name}")
        message = found[0]
        text = None
        if frame.get("franking") is not None:
            text = self.node.keys.verify_report(message, frame["franking"], self.codec)
        report = Report(
            id=uuid.uuid4().hex,
            channel=ch.name,
            seq=seq,
            reporter=self.user,
            sender=message.user,
            reason=reason,
            ts=int(time.time() * 1000),
            text=text,
            verified=text is not None,
        )
        await self._bounded(self.node.store.reports.add(report))
        return {"report_id": report.id, "verified": report.verified}

    # --- safety alerts (PROTOCOL.md section 7) -----------------------------------------

    async def _op_alert_trigger(self, frame: dict[str, Any]) -> Reply:
        return await self._bounded(self.node.alerts.trigger(self.user, frame))

    async def _op_alert_location(self, frame: dict[str, Any]) -> Reply:
        return await self._bounded(self.node.alerts.location(self.user, frame))

    async def _op_alert_ack(self, frame: dict[str, Any]) -> Reply:
        return await self._bounded(self.node.alerts.ack(self.user, frame))

    async def _op_alert_resolve(self, frame: dict[str, Any]) -> Reply:
        assert self.identity is not None
        return await self._bounded(
            self.node.alerts.resolve(self.user, self.identity.is_moderator, frame)
        )

    async def _op_alert_status(self, frame: dict[str, Any]) -> Reply:
        assert self.identity is not None
        return await self._bounded(
            self.node.alerts.status(self.user, self.identity.is_moderator, frame)
        )

    async def _op_location_share(self, frame: dict[str, Any]) -> Reply:
        assert self.identity is not None
        if "responder" not in self.identity.roles:
            raise ProtocolError("forbidden", "only responders share their location")
        return await self._bounded(self.node.alerts.share_location(self.user, frame))

    # --- moderation (PROTOCOL.md section 8) --------------------------------------------

    def _moderator(self) -> str:
        if self.identity is None or not self.identity.is_moderator:
            raise ProtocolError("forbidden", "moderators only")
        return self.identity.user

    async def _op_mod_watch(self, frame: dict[str, Any]) -> Reply:
        self._moderator()
        patterns = await self._bounded(self.node.moderation.watch(self, frame.get("pattern")))
        return {"patterns": patterns}

    async def _op_mod_unwatch(self, frame: dict[str, Any]) -> Reply:
        self._moderator()
        patterns = await self._bounded(self.node.moderation.unwatch(self, frame.get("pattern")))
        return {"patterns": patterns}

    async def _op_mod_delete(self, frame: dict[str, Any]) -> Reply:
        actor = self._moderator()
        return await self._bounded(self.node.moderation.delete(actor, frame))

    async def _op_mod_ban(self, frame: dict[str, Any]) -> Reply:
        actor = self._moderator()
        return await self._bounded(self.node.moderation.ban(actor, frame))

    async def _op_mod_unban(self, frame: dict[str, Any]) -> Reply:
        actor = self._moderator()
        return await self._bounded(self.node.moderation.unban(actor, frame))

    async def _op_mod_reports(self, frame: dict[str, Any]) -> Reply:
        self._moderator()
        state = frame.get("state", "open")
        if state not in ("open", "actioned", "dismissed"):
            raise ProtocolError("bad_request", "'state' must be open, actioned or dismissed")
        limit = arg_int(frame, "limit", minimum=1, maximum=500) or 100
        reports = await self._bounded(self.node.store.reports.list(state, limit))
        return {
            "reports": [
                {
                    "id": r.id,
                    "channel": r.channel,
                    "seq": r.seq,
                    "reporter": r.reporter,
                    "sender": r.sender,
                    "reason": r.reason,
                    "ts": r.ts,
                    "text": r.text,
                    "verified": r.verified,
                    "state": r.state,
                }
                for r in reports
            ]
        }

    async def _op_mod_resolve_report(self, frame: dict[str, Any]) -> Reply:
        actor = self._moderator()
        report_id = require_str(frame, "report_id", max_len=64)
        state = frame.get("state")
        if state not in ("actioned", "dismissed"):
            raise ProtocolError("bad_request", "'state' must be actioned or dismissed")
        if not await self._bounded(self.node.store.reports.resolve(report_id, state)):
            raise ProtocolError("not_found", "no open report with that id")
        await self._bounded(
            self.node.moderation.audit(actor, "resolve_report", report_id=report_id, state=state)
        )
        return {"report_id": report_id, "state": state}

    async def _op_mod_audit(self, frame: dict[str, Any]) -> Reply:
        self._moderator()
        since = arg_int(frame, "since") or 0
        limit = arg_int(frame, "limit", minimum=1, maximum=1000) or 100
        return {"entries": await self._bounded(self.node.moderation.audit_log(since, limit))}

    async def _op_mod_alerts(self, frame: dict[str, Any]) -> Reply:
        self._moderator()
        return {"alerts": await self._bounded(self.node.alerts.active())}
