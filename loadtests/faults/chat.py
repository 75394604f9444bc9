"""Fault scenarios: chat (see loadtests/faults/__init__.py).

Every scenario runs the same load on a real cluster (loadtests/faults/cluster.py: two nodes,
one Redis, one MongoDB): subscribers split across the nodes, each a `client.Client`
subscribed to three channels; a publisher posting on the first at a steady rate; and, once
the fault is on, two "last words" after which their channels stay quiet (no later message can
repair a gap there): one from a user who posted in that channel before the fault, one from a
newcomer posting for the first time. The fault is injected into a real process; the load goes
on for a while after it ends; then every subscriber must hold every acknowledged message, once
and in order. Figures:

- sent / acked: messages published / answered ok (a retry with the same client_msg_id is one
  message; `duplicate: true` answers count in `dup_acks`).
- delivered: acknowledged messages that reached every subscriber; lost: the others (must be 0).
- duplicated: message pushes that reached a subscriber more than once, counted before the
  client's own dedupe (`Client.duplicates`) and after it (must be 0).
- recovery_s: from the end of the fault (the kill, the restart, SIGCONT) until every
  subscriber has everything up to the first message published after it.
- max_reply_s: the slowest answer to one publish attempt (ok or `unavailable`);
  unavailable: attempts answered `unavailable`; gave_up: attempts the client library gave up
  on (connection lost or no answer in time), retried by the publisher with the same id;
  errors: refusals other than `unavailable` (must be none); resumed: subscribers of a killed
  node that reconnected elsewhere; last_words: whether both quiet-channel posts arrived;
  present: subscribers listed by `presence` on the main channel once the fault is over.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from realtime_safety.client import Client, ConnectionLost, ServerError

from .cluster import Cluster, Proc
from .report import FaultResult, Scenario

log = logging.getLogger("realtime_safety.loadtests.faults.chat")


@dataclass(frozen=True)
class Plan:
    subscribers: int
    rate: float  # publishes per second
    before_s: float  # load before the fault
    fault_s: float  # how long the fault lasts (0: instantaneous, a kill)
    after_s: float  # load after the fault ended
    drain_s: float = 20.0  # at most this long for the last deliveries


def plan(scale: float, fault_s: float = 0.0, floor_s: float = 2.0, rate: float = 50.0) -> Plan:
    """Scale 1.0: 20 subscribers, 50 msg/s, 5 s of load either side of the fault."""
    return Plan(
        subscribers=max(4, round(20 * scale)),
        rate=max(10.0, rate * min(1.0, max(scale, 0.4))),
        before_s=max(1.0, 5 * scale),
        fault_s=max(floor_s, fault_s * scale) if fault_s else 0.0,
        after_s=max(1.5, 5 * scale),
    )


PRESENCE_HEARTBEAT_S = 1.0  # RT_PRESENCE_HEARTBEAT_S of the nodes (node timeout: 3x)
PRESENCE_WAIT_S = 4 * PRESENCE_HEARTBEAT_S  # for presence to settle after the fault


def store_timeout(p: Plan) -> float:
    """RT_STORE_TIMEOUT_S of the nodes: 2 s, at most half a pause (so a paused store or
    broker answers `unavailable` or times out while the fault is still on)."""
    return min(2.0, max(0.5, p.fault_s / 2)) if p.fault_s else 2.0


def _now() -> float:
    return time.monotonic()


def _body(text: str) -> dict[str, Any]:
    return {"v": 1, "alg": "none", "text": text}


@dataclass
class Subscriber:
    client: Client
    home: int  # the node it connects to first
    seen: dict[str, dict[int, float]] = field(default_factory=dict)  # channel: seq: arrival
    repeats: int = 0  # seqs the application got twice (the client should drop them)
    out_of_order: int = 0  # seqs the application got after a higher one

    async def consume(self, channels: list[str]) -> None:
        last: dict[str, int] = {}
        async for push in self.client.pushes():
            channel = push.get("channel")
            if push.get("push") != "message" or channel not in channels:
                continue
            seq = int(push["seq"])
            seen = self.seen.setdefault(channel, {})
            if seq in seen:
                self.repeats += 1
                continue
            seen[seq] = _now()
            if seq < last.get(channel, 0):
                self.out_of_order += 1
            last[channel] = max(seq, last.get(channel, 0))


@dataclass
class Publisher:
    client: Client
    attempts: int  # Client.publish's own attempts per call
    acked: dict[tuple[str, int], str] = field(default_factory=dict)  # (channel, seq): cmid
    started: dict[str, float] = field(default_factory=dict)  # cmid: first attempt
    seq_of: dict[str, int] = field(default_factory=dict)  # cmid: acknowledged seq
    sent: int = 0
    unavailable: int = 0
    gave_up: int = 0
    dup_acks: int = 0
    seq_conflicts: int = 0  # one seq acknowledged for two different messages
    max_reply_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # refusals other than `unavailable`

    async def publish(self, channel: str, cmid: str, give_up_at: float) -> int | None:
        """Publish one message, retrying with the same client_msg_id until acknowledged."""
        self.sent += 1
        self.started[cmid] = _now()
        while _now() < give_up_at:
            t0 = _now()
            try:
                reply = await self.client.publish(
                    channel, _body(cmid), client_msg_id=cmid, attempts=self.attempts
                )
            except ServerError as exc:
                self.max_reply_s = max(self.max_reply_s, _now() - t0)
                if exc.code != "unavailable":  # not to be retried: a failure of the scenario
                    log.warning("publish %s refused: %s", cmid, exc)
                    self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
                    return None
                self.unavailable += 1
                await asyncio.sleep(0.1)
                continue
            except (ConnectionLost, ConnectionClosed, TimeoutError) as exc:
                log.info("publish %s: the client gave up (%r); retrying", cmid, exc)
                self.gave_up += 1
                await asyncio.sleep(0.1)
                continue
            self.max_reply_s = max(self.max_reply_s, _now() - t0)
            seq = int(reply["seq"])
            if reply.get("duplicate"):
                self.dup_acks += 1
            other = self.acked.setdefault((channel, seq), cmid)
            if other != cmid:
                self.seq_conflicts += 1
            self.seq_of[cmid] = seq
            return seq
        return None

    async def load(self, channel: str, rate: float, stop: asyncio.Event, give_up_at: float) -> None:
        next_at = _now()
        for i in range(10**9):
            if stop.is_set():
                return
            await self.publish(channel, f"m{i}", give_up_at)
            next_at = max(next_at + 1 / rate, _now() - 1 / rate)  # no burst to catch up
            await asyncio.sleep(max(0.0, next_at - _now()))


@dataclass
class Fault:
    """What to do to the cluster: `begin`, wait the plan's fault_s, `end` (either may be a
    no-op). `victims` are the nodes whose clients must reconnect elsewhere."""

    describe: str
    begin: Callable[[Cluster], None]
    end: Callable[[Cluster], None] = lambda c: None
    victims: tuple[int, ...] = ()
    own_mongo: bool = False


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll a condition every 50 ms, at most `timeout` seconds."""
    deadline = _now() + timeout
    while not condition():
        if _now() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _drive(
    c: Cluster, name: str, fault: Fault, p: Plan, *, pub_node: int, attempts: int
) -> FaultResult:
    run = uuid.uuid4().hex[:8]
    main = f"public:faults-{run}"
    quiet = f"{main}-quiet"  # the last word: its sender posted there before the fault
    fresh = f"{main}-fresh"  # a newcomer's first post ever, during the fault
    channels = [main, quiet, fresh]
    nodes = len(c.nodes)

    def urls(home: int) -> list[str]:
        return [c.url((home + k) % nodes) for k in range(nodes)]

    subs = [
        Subscriber(Client(urls(i % nodes), c.token(f"sub{i}")), i % nodes)
        for i in range(p.subscribers)
    ]
    pub = Publisher(Client(urls(pub_node), c.token("publisher")), attempts)
    last_word = Publisher(Client(urls(pub_node), c.token("last-word")), attempts)
    newcomer = Publisher(Client(urls(pub_node), c.token("newcomer")), attempts)
    publishers = [pub, last_word, newcomer]
    clients = [s.client for s in subs] + [p_.client for p_ in publishers]
    await asyncio.gather(*(cl.connect() for cl in clients))
    for s in subs:
        for ch in channels:
            await s.client.subscribe(ch)
    consumers = [asyncio.create_task(s.consume(channels)) for s in subs]
    stop = asyncio.Event()
    give_up_at = _now() + p.before_s + p.fault_s + p.after_s + 30
    await last_word.publish(quiet, "hello", give_up_at)
    load = asyncio.create_task(pub.load(main, p.rate, stop, give_up_at))
    words: list[asyncio.Task[int | None]] = []

    def say_last_words() -> None:
        words.append(asyncio.create_task(last_word.publish(quiet, "last-word", give_up_at)))
        words.append(asyncio.create_task(newcomer.publish(fresh, "first-word", give_up_at)))

    try:
        await asyncio.sleep(p.before_s)
        if not p.fault_s:  # a kill: the last words are in flight when it happens
            say_last_words()
            await asyncio.sleep(0.005)
        log.info("%s: %s", name, fault.describe)
        await asyncio.to_thread(fault.begin, c)
        if p.fault_s:
            # Early in the fault: a store paused longer than the store timeout answers
            # `unavailable`, and the retry finds the first attempt stored.
            await asyncio.sleep(0.1)
            say_last_words()
            await asyncio.sleep(p.fault_s - 0.1)
            await asyncio.to_thread(fault.end, c)
        fault_end = _now()
        await asyncio.sleep(p.after_s)
        stop.set()
        await load
        await asyncio.gather(*words)

        def complete() -> bool:
            return all(
                seq in s.seen.get(ch, {}) for s in subs for p_ in publishers for ch, seq in p_.acked
            )

        await _until(complete, p.drain_s)
        # Presence follows the fault: every subscriber is listed on the main channel again
        # (a restarted Redis forgot it all; a dead node's entries are reaped, its users are
        # present through the node they moved to).
        want = {f"sub{i}" for i in range(p.subscribers)}
        present: set[str] = set()

        async def presence_right() -> bool:
            nonlocal present
            try:
                reply = await subs[0].client.request("presence", channel=main, limit=1000)
            except (ServerError, ConnectionLost, ConnectionClosed, TimeoutError):
                return False
            present = {m["user"] for m in reply["members"]}
            return present == want

        for _ in range(int(PRESENCE_WAIT_S / 0.2)):  # a bounded poll
            if await presence_right():
                break
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        for task in [load, *consumers, *words]:
            task.cancel()
        await asyncio.gather(load, *consumers, *words, return_exceptions=True)
        await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)

    acked = [key for p_ in publishers for key in p_.acked]
    delivered = sum(all(seq in s.seen.get(ch, {}) for s in subs) for ch, seq in acked)
    missing = sum(seq not in s.seen.get(ch, {}) for s in subs for ch, seq in acked)
    duplicated = sum(s.repeats + s.client.duplicates for s in subs)
    order_errors = sum(s.out_of_order + s.client.gaps for s in subs)
    after = [
        pub.seq_of[cmid] for cmid, t in pub.started.items() if t >= fault_end and cmid in pub.seq_of
    ]
    recovery: float | None = None
    if after:
        first = min(after)
        needed = [seq for ch, seq in pub.acked if seq <= first]
        arrivals = [s.seen.get(main, {}).get(seq) for s in subs for seq in needed]
        if all(a is not None for a in arrivals):
            recovery = max(0.0, max(a for a in arrivals if a is not None) - fault_end)
    moved = sum(s.client.reconnects > 0 for s in subs if s.home in fault.victims)
    victims = sum(s.home in fault.victims for s in subs)
    errors: dict[str, int] = {}
    for p_ in publishers:
        for code, n in p_.errors.items():
            errors[code] = errors.get(code, 0) + n
    words_ok = all(
        any(ch == want for ch, _ in p_.acked)
        and all(seq in s.seen.get(ch, {}) for s in subs for ch, seq in p_.acked)
        for p_, want in ((last_word, quiet), (newcomer, fresh))
    )
    ok = (
        len(acked) > 0
        and len(acked) - delivered == 0
        and duplicated == 0
        and order_errors == 0
        and sum(p_.seq_conflicts for p_ in publishers) == 0
        and not errors
        and recovery is not None
        and moved == victims
        and words_ok
        and present == want
    )
    gave_up = sum(p_.gave_up for p_ in publishers)
    if fault.victims:
        # A node kill: the client library's own retries must carry every publish over.
        ok = ok and gave_up == 0
    extra: dict[str, Any] = {
        "subscribers": p.subscribers,
        "rate": p.rate,
        "fault_s": p.fault_s,
        "unavailable": sum(p_.unavailable for p_ in publishers),
        "gave_up": gave_up,
        "dup_acks": sum(p_.dup_acks for p_ in publishers),
        "max_reply_s": round(max(p_.max_reply_s for p_ in publishers), 2),
        "missing": missing,
        "order_errors": order_errors,
        "resumed": f"{moved}/{victims}",
        "last_words": "delivered" if words_ok else "LOST",
        "present": f"{len(present & want)}/{len(want)}"
        + (f" (+{len(present - want)} stale)" if present - want else ""),
    }
    if errors:
        extra["errors"] = errors
    conflicts = sum(p_.seq_conflicts for p_ in publishers)
    if conflicts:
        extra["seq_conflicts"] = conflicts
    return FaultResult(
        scenario=name,
        fault=fault.describe,
        sent=sum(p_.sent for p_ in publishers),
        acked=len(acked),
        delivered=delivered,
        lost=len(acked) - delivered,
        duplicated=duplicated,
        recovery_s=None if recovery is None else round(recovery, 2),
        extra=extra,
        ok=ok,
    )


def _scenario(
    name: str,
    fault: Fault,
    fault_s: float,
    floor_s: float,
    *,
    pub_node: int,
    attempts: int,
    rate: float = 50.0,
) -> Callable[[float], FaultResult]:
    def run(scale: float) -> FaultResult:
        p = plan(scale, fault_s, floor_s, rate)
        cluster = Cluster(
            2,
            store_timeout_s=store_timeout(p),
            own_mongo=fault.own_mongo,
            extra_env={
                "RT_PRESENCE_HEARTBEAT_S": str(PRESENCE_HEARTBEAT_S),
                "RT_PRESENCE_NODE_TIMEOUT_S": str(3 * PRESENCE_HEARTBEAT_S),
            },
        )
        with cluster as c:
            result = asyncio.run(_drive(c, name, fault, p, pub_node=pub_node, attempts=attempts))
            if not result.ok:
                result.notes = f"logs kept in {c.work}"
                c.keep = True
        return result

    return run


def _kill(n: int) -> Callable[[Cluster], None]:
    return lambda c: c.nodes[n].kill()


def _redis(action: Callable[[Proc], None]) -> Callable[[Cluster], None]:
    return lambda c: action(c.redis)


def _mongo(action: Callable[[Proc], None]) -> Callable[[Cluster], None]:
    def act(c: Cluster) -> None:
        assert c.mongo is not None
        action(c.mongo)

    return act


SCENARIOS: dict[str, Scenario] = {
    "node-kill": Scenario(
        "SIGKILL a node holding half the subscribers; they resume on the other with since_seq",
        _scenario(
            "node-kill",
            Fault("SIGKILL of a subscribers' node", _kill(0), victims=(0,)),
            0,
            0,
            pub_node=1,
            attempts=5,
        ),
    ),
    "publisher-node-kill": Scenario(
        "SIGKILL the publisher's node; unacknowledged publishes retried on the other node",
        _scenario(
            "publisher-node-kill",
            Fault("SIGKILL of the publisher's node", _kill(0), victims=(0,)),
            0,
            0,
            pub_node=0,
            attempts=5,
        ),
    ),
    "redis-restart": Scenario(
        "Redis killed, restarted on the same port (no persistence) under load",
        _scenario(
            "redis-restart",
            Fault("Redis SIGKILL, restarted after fault_s", _redis(Proc.kill), _redis(Proc.start)),
            5,
            1,
            pub_node=0,
            attempts=1,
        ),
    ),
    "redis-pause": Scenario(
        "Redis SIGSTOPped for 10 s (x scale, at least 2 s), then SIGCONT, under load",
        _scenario(
            "redis-pause",
            Fault(
                "Redis SIGSTOP for fault_s, then SIGCONT", _redis(Proc.pause), _redis(Proc.resume)
            ),
            10,
            2,
            pub_node=0,
            attempts=1,
        ),
    ),
    "store-pause": Scenario(
        "MongoDB (SecantusDB) SIGSTOPped for 10 s (x scale, at least 2 s), then SIGCONT",
        _scenario(
            "store-pause",
            Fault(
                "MongoDB SIGSTOP for fault_s, then SIGCONT",
                _mongo(Proc.pause),
                _mongo(Proc.resume),
                own_mongo=True,
            ),
            10,
            2,
            pub_node=0,
            attempts=1,
            rate=25.0,
        ),
    ),
}
