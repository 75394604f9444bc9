"""The Python client library: speaks protocol v1, reconnects, resumes with `since_seq`.

    async with Client(["ws://127.0.0.1:8000/ws"], token) as client:
        await client.subscribe("public:lobby")
        await client.publish("public:lobby", {"v": 1, "alg": "none", "text": "hi"})
        async for push in client.pushes():
            ...

On a lost connection the client reconnects (exponential backoff with jitter, trying each URL
in turn), authenticates again and re-subscribes every channel with `since_seq` = the last seq
it received, so the application sees every message once and in order. `publish` keeps its
`client_msg_id` across retries, so a publish interrupted by a node failure is never doubled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from realtime_safety.protocol import CODECS, SUBPROTOCOL_JSON, Codec

log = logging.getLogger("realtime_safety.client")


class ServerError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code: str = error.get("code", "internal")
        self.error = error


class ConnectionLost(Exception):
    """The connection went away before the reply arrived."""


class Client:
    def __init__(
        self,
        urls: list[str] | str,
        token: str | Callable[[], str],
        *,
        fmt: str = SUBPROTOCOL_JSON,
        max_backoff_s: float = 5.0,
        request_timeout_s: float = 15.0,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self._token = token
        self.codec: Codec = CODECS[fmt]
        self._max_backoff = max_backoff_s
        self._timeout = request_timeout_s
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self.last_seq: dict[str, int] = {}  # per subscribed channel: the last seq delivered
        self.user: str | None = None
        self.node: str | None = None
        self.reconnects = 0
        self.duplicates = 0  # message pushes at or below last_seq (the server should send none)
        self.gaps = 0  # message pushes that skipped a seq (the server should send none)
        self.last_close_code: int | None = None

    def _token_value(self) -> str:
        return self._token() if callable(self._token) else self._token

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (the first time) and keep reconnecting in the background until close()."""
        if self._runner is None:
            first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._runner = asyncio.create_task(self._run(first), name="rt-client")
            await first

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except (asyncio.CancelledError, Exception):
                pass

    # --- the connection loop ----------------------------------------------------------

    async def _open(self, url: str) -> ClientConnection:
        ws = await connect(
            url,
            subprotocols=[self.codec.name],  # type: ignore[list-item]
            max_size=None,
            open_timeout=self._timeout,
        )
        self._ws = ws
        reader = asyncio.create_task(self._read(ws), name="rt-client-reader")
        try:
            reply = await self._call(ws, {"op": "auth", "token": self._token_value()})
            self.user, self.node = reply["user"], reply["node"]
            for channel, seq in list(self.last_seq.items()):
                await self._call(ws, {"op": "subscribe", "channel": channel, "since_seq": seq})
        except BaseException:
            reader.cancel()
            await ws.close()
            raise
        ws.reader = reader  # type: ignore[attr-defined]
        return ws

    async def _run(self, first: asyncio.Future[None]) -> None:
        backoff = 0.05
        for attempt in itertools.count():
            url = self.urls[attempt % len(self.urls)]
            try:
                ws = await self._open(url)
            except (OSError, ConnectionClosed, TimeoutError, ConnectionLost) as exc:
                log.info("connect to %s failed: %s", url, exc)
            except ServerError as exc:
                if not first.done():
                    first.set_exception(exc)
                    return
                log.warning("server refused the session: %s", exc)
            else:
                if not first.done():
                    first.set_result(None)
                backoff = 0.05
                self._connected.set()
                await ws.reader  # type: ignore[attr-defined]
                self._connected.clear()
                self.last_close_code = ws.close_code
                if self._closing:
                    return
                self.reconnects += 1
                if ws.close_code in (4003, 4009):
                    if not first.done():
                        first.set_exception(ConnectionLost(f"closed {ws.close_code}"))
                    return
            if self._closing:
                return
            if attempt + 1 >= len(self.urls) * 20 and not first.done():
                first.set_exception(ConnectionLost("could not connect to any server"))
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                frame = self.codec.decode(data)
                if "push" in frame:
                    self._on_push(frame)
                    continue
                fut = self._waiting.pop(frame.get("id", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
        except ConnectionClosed:
            pass
        finally:
            # Not connected from here on: a request (a publish retrying) waits for the next
            # connection instead of writing to this dead one.
            if self._ws is ws:
                self._connected.clear()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionLost("connection closed"))
            self._waiting.clear()

    def _on_push(self, push: dict[str, Any]) -> None:
        if push.get("push") == "message":
            channel, seq = push["channel"], push["seq"]
            last = self.last_seq.get(channel)
            if last is not None:
                if seq <= last:
                    self.duplicates += 1
                    return
                if seq != last + 1:
                    self.gaps += 1
            self.last_seq[channel] = seq
        self._pushes.put_nowait(push)

    async def _call(self, ws: ClientConnection, command: dict[str, Any]) -> dict[str, Any]:
        cid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        try:
            await ws.send(self.codec.encode({"id": cid, **command}))
            async with asyncio.timeout(self._timeout):
                reply = await fut
        finally:
            if self._waiting.get(cid) is fut:
                del self._waiting[cid]
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: the send's own error is the one raised
        if not reply.get("ok"):
            raise ServerError(reply.get("error", {}))
        return reply

    # --- the API ----------------------------------------------------------------------

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """One command on the current connection (waits for a connection first)."""
        async with asyncio.timeout(self._timeout):
            await self._connected.wait()
        assert self._ws is not None
        return await self._call(self._ws, {"op": op, **args})

    async def subscribe(self, channel: str, since_seq: int | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"channel": channel}
        if since_seq is not None:
            args["since_seq"] = since_seq
        reply = await self.request("subscribe", **args)
        self.last_seq.setdefault(channel, reply["last_seq"] if since_seq is None else since_seq)
        return reply

    async def unsubscribe(self, channel: str) -> None:
        self.last_seq.pop(channel, None)
        await self.request("unsubscribe", channel=channel)

    async def retrying(
        self, op: str, *, attempts: int | None = 5, deadline_s: float | None = None, **args: Any
    ) -> dict[str, Any]:
        """An idempotent command, sent again (same arguments, so the same idempotency key)
        after a lost connection, a timeout or `unavailable`, until it is answered `ok`, refused
        for good (`ServerError`), `attempts` are spent or `deadline_s` has passed."""
        loop = asyncio.get_running_loop()
        end = None if deadline_s is None else loop.time() + deadline_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.request(op, **args)
            except (ConnectionLost, ConnectionClosed, TimeoutError, ServerError) as exc:
                if isinstance(exc, ServerError) and exc.code != "unavailable":
                    raise
                pause = min(self._max_backoff, 0.05 * 2 ** min(attempt, 10))
                # an overloaded node says when to come back: never sooner
                floor = (
                    exc.error.get("retry_after_ms", 0) / 1000 if isinstance(exc, ServerError) else 0
                )
                pause = max(pause, floor)
                out_of_time = end is not None and loop.time() + pause >= end
                if attempt == attempts or out_of_time:
                    raise
                # A lost connection: the next attempt waits for the next one (see _read);
                # the pause covers a socket that died before its reader noticed.
                await asyncio.sleep(max(floor, pause * (0.5 + random.random())))

    async def publish(
        self,
        channel: str,
        body: dict[str, Any],
        *,
        client_msg_id: str | None = None,
        attempts: int = 5,
    ) -> dict[str, Any]:
        """Publish; retried across reconnects with the same `client_msg_id` (idempotent)."""
        cmid = client_msg_id or uuid.uuid4().hex
        return await self.retrying(
            "publish", attempts=attempts, channel=channel, body=body, client_msg_id=cmid
        )

    async def trigger_alert(
        self,
        kind: str,
        location: dict[str, Any],
        *,
        note: str | None = None,
        client_alert_id: str | None = None,
        deadline_s: float = 120.0,
    ) -> dict[str, Any]:
        """Trigger a safety alert: `{alert_id, channel}` once the server has stored the alert
        and its whole delivery plan. Until then it is sent again — across reconnects, to any
        node — with the same `client_alert_id`, so it is never doubled; a refusal such as
        `rate_limited` raises `ServerError` at once (tell the user to call emergency
        services)."""
        args: dict[str, Any] = {
            "kind": kind,
            "location": location,
            "client_alert_id": client_alert_id or uuid.uuid4().hex,
        }
        if note is not None:
            args["note"] = note
        return await self.retrying("alert.trigger", attempts=None, deadline_s=deadline_s, **args)

    async def alert_received(self, alert_id: str, route: str = "ws") -> dict[str, Any]:
        """Tell the server this app has the alert (by `route`: "ws" for the `alert` push on
        `user:<id>`, "push" for the FCM/APNs notification): only then does the owner see it
        `delivered`, and the SMS fallback stands down. Retried across reconnects (it is
        idempotent); send it as soon as the alert is shown."""
        return await self.retrying("alert.received", alert_id=alert_id, route=route)

    async def history(
        self, channel: str, before_seq: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        args: dict[str, Any] = {"channel": channel}
        if before_seq is not None:
            args["before_seq"] = before_seq
        if limit is not None:
            args["limit"] = limit
        return await self.request("history", **args)

    async def next_push(self, timeout: float | None = None) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await self._pushes.get()

    async def pushes(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self._pushes.get()
