"""The node's fan-out hub: broker topics in, the same encoded frame out to every local socket.

- One broker subscription per channel per node, however many local sockets watch the channel
  (reference counted: the last local subscriber leaving unsubscribes the node).
- Messages reach local subscribers in `seq` order, each once: the hub tracks the next expected
  seq per channel, holds back a message that arrives early and repairs a gap from the store
  (a message is always stored before it is published, so the store has what pub/sub lost or
  reordered: another node's publish overtaking, a node dying between store and publish,
  a Redis reconnect).
- Each push is encoded at most once per wire format (`Frame`), however many sockets get it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from realtime_safety.protocol import Frame
from realtime_safety.storage import Message, MessageStore

from .broker import Broker, BrokerUnavailable
from .metrics import ChannelMetrics

log = logging.getLogger("realtime.hub")

CHANNEL_TOPIC = "rt:ch:"
CONTROL_TOPIC = "rt:ctl"
MOD_TOPIC = "rt:mod"  # every message once more, for moderators watching patterns
GAP_WAIT_S = 0.05
REPAIR_PAGE = 500


def message_item(m: Message) -> dict[str, Any]:
    """A message as it appears in pushes (with "push") and in history replies."""
    return {
        "channel": m.channel,
        "seq": m.seq,
        "ts": m.ts,
        "from": {"user": m.user, "device": m.device},
        "client_msg_id": m.client_msg_id,
        "body": m.body,
    }


def message_frame(m: Message) -> Frame:
    return Frame({"push": "message", **message_item(m)})


class Subscriber(Protocol):
    """A local socket as the hub sees it."""

    @property
    def user(self) -> str: ...

    def deliver(self, channel: str, seq: int, frame: Frame) -> None: ...

    def deliver_event(self, channel: str, frame: Frame) -> None: ...


def pack_message(m: Message) -> bytes:
    data: bytes = msgpack.packb(
        {
            "t": "m",
            "c": m.channel,
            "s": m.seq,
            "ts": m.ts,
            "u": m.user,
            "d": m.device,
            "i": m.client_msg_id,
            "b": m.body,
        },
        use_bin_type=True,
    )
    return data


def pack_event(kind: str, channel: str, **fields: Any) -> bytes:
    data: bytes = msgpack.packb({"t": kind, "c": channel, **fields}, use_bin_type=True)
    return data


class _Channel:
    __slots__ = ("early", "init", "next_seq", "pending", "repair", "subscribers")

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.next_seq: int | None = None  # None until initialised
        self.early: list[Message] = []  # arrived before initialisation finished
        self.pending: dict[int, Message] = {}  # arrived ahead of next_seq
        self.init: asyncio.Task[None] | None = None
        self.repair: asyncio.Task[None] | None = None


class Hub:
    def __init__(
        self,
        broker: Broker,
        messages: MessageStore,
        on_control: Callable[[dict[str, Any]], None],
        *,
        metrics: ChannelMetrics | None = None,
    ) -> None:
        self.metrics = metrics or ChannelMetrics()
        self._broker = broker
        self._messages = messages
        self._on_control = on_control
        self._channels: dict[str, _Channel] = {}
        self._topic_lock = asyncio.Lock()  # orders broker (un)subscribe calls
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsent: dict[str, Message] = {}  # per channel: the newest message not fanned out
        self._republisher: asyncio.Task[None] | None = None
        self.on_mod: Callable[[str, Frame], None] = lambda channel, frame: None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self._broker.start(self._on_broker, self.resync)
        await self._broker.subscribe(CONTROL_TOPIC)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._broker.close()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hub task %s failed", task.get_name(), exc_info=task.exception())

    @staticmethod
    def frame(push: dict[str, Any]) -> Frame:
        return Frame(push)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    # --- local subscribers ------------------------------------------------------------

    async def add(self, channel: str, sub: Subscriber) -> None:
        """Register a local subscriber; returns once the node receives the channel."""
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
            state.init = self._spawn(self._init(channel, state), f"hub-init:{channel}")
        state.subscribers.add(sub)
        assert state.init is not None
        try:
            await asyncio.shield(state.init)
        except BaseException:
            self.remove(channel, sub)
            raise

    def remove(self, channel: str, sub: Subscriber) -> None:
        state = self._channels.get(channel)
        if state is None:
            return
        state.subscribers.discard(sub)
        if state.subscribers:
            return
        del self._channels[channel]
        if state.init is not None and not state.init.done():
            state.init.cancel()
        if state.repair is not None:
            state.repair.cancel()
        self._spawn(self._unsubscribe(channel), f"hub-unsub:{channel}")

    async def _unsubscribe(self, channel: str) -> None:
        async with self._topic_lock:
            if channel not in self._channels:
                await self._broker.unsubscribe(CHANNEL_TOPIC + channel)

    async def _init(self, channel: str, state: _Channel) -> None:
        async with self._topic_lock:
            await self._broker.subscribe(CHANNEL_TOPIC + channel)
        last = await self._messages.last_seq(channel)
        state.next_seq = last + 1
        early, state.early = state.early, []
        for m in early:
            self._accept(state, m)

    # --- publishing -------------------------------------------------------------------

    async def publish(self, m: Message, *, moderators: bool = True) -> None:
        data = pack_message(m)
        with self.metrics.broker_publish_seconds.time():
            await self._broker.publish(CHANNEL_TOPIC + m.channel, data)
        if moderators:
            await self._broker.publish(MOD_TOPIC, data)

    def deliver_local(self, m: Message) -> None:
        """Hand a stored message to local subscribers directly (broker unreachable)."""
        state = self._channels.get(m.channel)
        if state is not None:
            self._accept(state, m)

    def publish_later(self, m: Message) -> None:
        """A stored message whose fan-out failed (broker unreachable or paused) is published
        again until the broker takes it, so other nodes get it even if the channel then goes
        quiet. Only the newest per channel is kept: a node that receives it repairs anything
        older from the store, and hubs deliver each seq once."""
        old = self._unsent.get(m.channel)
        if old is None or old.seq < m.seq:
            self._unsent[m.channel] = m
        if self._republisher is None or self._republisher.done():
            self._republisher = self._spawn(self._republish(), "hub-republish")

    async def _republish(self) -> None:
        backoff = 0.1
        while self._unsent:
            await asyncio.sleep(backoff)
            for channel, m in list(self._unsent.items()):
                try:
                    await self._broker.publish(CHANNEL_TOPIC + channel, pack_message(m))
                except BrokerUnavailable:
                    backoff = min(backoff * 2, 5.0)
                    break
                if self._unsent.get(channel) is m:
                    del self._unsent[channel]
            else:
                backoff = 0.1

    async def publish_event(self, channel: str, kind: str, **fields: Any) -> None:
        await self._broker.publish(CHANNEL_TOPIC + channel, pack_event(kind, channel, **fields))

    async def publish_mod(self, push: dict[str, Any]) -> None:
        """A push for moderators watching the push's channel, on every node."""
        data: bytes = msgpack.packb(
            {"t": "raw", "c": push["channel"], "p": push}, use_bin_type=True
        )
        await self._broker.publish(MOD_TOPIC, data)

    async def watch(self, on: bool) -> None:
        """Receive the moderation stream (while this node has watchers) or stop."""
        async with self._topic_lock:
            if on:
                await self._broker.subscribe(MOD_TOPIC)
            else:
                await self._broker.unsubscribe(MOD_TOPIC)

    async def publish_control(self, event: dict[str, Any]) -> None:
        await self._broker.publish(CONTROL_TOPIC, msgpack.packb(event, use_bin_type=True))

    # --- from the broker --------------------------------------------------------------

    def _on_broker(self, topic: str, data: bytes) -> None:
        try:
            event = msgpack.unpackb(data, raw=False)
        except Exception:
            log.warning("dropping an undecodable broker frame on %s", topic)
            return
        if topic == CONTROL_TOPIC:
            self._on_control(event)
            return
        if topic == MOD_TOPIC:
            if event.get("t") == "m":
                m = Message(
                    event["c"],
                    event["s"],
                    event["ts"],
                    event["u"],
                    event["d"],
                    event["i"],
                    event["b"],
                )
                self.on_mod(m.channel, message_frame(m))
            elif event.get("t") == "raw":
                self.on_mod(event["c"], Frame(event["p"]))
            return
        channel = event.get("c")
        state = self._channels.get(channel) if isinstance(channel, str) else None
        if state is None:
            return
        if event.get("t") == "m":
            m = Message(
                channel, event["s"], event["ts"], event["u"], event["d"], event["i"], event["b"]
            )
            if state.next_seq is None:
                state.early.append(m)
            else:
                self._accept(state, m)
        elif event.get("t") == "deleted":
            frame = Frame({"push": "deleted", "channel": channel, "seq": event["s"]})
            for sub in list(state.subscribers):
                sub.deliver_event(channel, frame)
        elif event.get("t") == "raw":  # a push built elsewhere (alerts), as is
            frame = Frame(event["p"])
            for sub in list(state.subscribers):
                sub.deliver_event(channel, frame)
        elif event.get("t") == "rekey":
            frame = Frame({"push": "rekey", "channel": channel})
            for sub in list(state.subscribers):
                sub.deliver_event(channel, frame)
        elif event.get("t") in ("typing", "join", "leave"):
            frame = Frame({"push": event["t"], "channel": channel, "user": event["u"]})
            for sub in list(state.subscribers):
                if sub.user != event["u"]:
                    sub.deliver_event(channel, frame)

    def _accept(self, state: _Channel, m: Message) -> None:
        assert state.next_seq is not None
        if m.seq < state.next_seq:
            return  # already delivered
        if m.seq > state.next_seq:
            state.pending[m.seq] = m
            self._schedule_repair(m.channel, state)
            return
        self._deliver(state, m)
        while state.next_seq in state.pending:
            self._deliver(state, state.pending.pop(state.next_seq))

    def _deliver(self, state: _Channel, m: Message) -> None:
        state.next_seq = m.seq + 1
        start = time.perf_counter()
        frame = message_frame(m)
        for sub in list(state.subscribers):
            sub.deliver(m.channel, m.seq, frame)
        self.metrics.fanout_seconds.observe(time.perf_counter() - start)
        self.metrics.delivery_lag_seconds.observe(max(0.0, time.time() - m.ts / 1000))

    # --- gap repair -------------------------------------------------------------------

    def _schedule_repair(
        self, channel: str, state: _Channel, *, wait: float = GAP_WAIT_S, to_end: bool = False
    ) -> None:
        if state.repair is None or state.repair.done():
            state.repair = self._spawn(
                self._repair(channel, state, wait, to_end), f"hub-repair:{channel}"
            )

    async def _repair(self, channel: str, state: _Channel, wait: float, to_end: bool) -> None:
        """Fill a gap from the store. Waits briefly first: usually the missing message is
        just behind in pub/sub. `to_end` reads everything stored (after a broker reconnect)."""
        await asyncio.sleep(wait)
        backoff = 0.1
        while self._channels.get(channel) is state and state.next_seq is not None:
            if not to_end and not state.pending:
                return
            try:
                page = await self._messages.after(channel, state.next_seq - 1, REPAIR_PAGE)
            except Exception as exc:
                log.warning("gap repair on %s failed (%s); retrying", channel, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for m in page:
                self._accept(state, m)
            if len(page) < REPAIR_PAGE:
                if to_end or not state.pending:
                    return
                await asyncio.sleep(backoff)  # a publish is still in flight
                backoff = min(backoff * 2, 5.0)

    def resync(self) -> None:
        """After a broker reconnect: deliver whatever was published while we were away."""
        self._on_control({"t": "resync"})
        for channel, state in self._channels.items():
            if state.next_seq is not None:
                if state.repair is not None and not state.repair.done():
                    state.repair.cancel()
                state.repair = None
                self._schedule_repair(channel, state, wait=0, to_end=True)
