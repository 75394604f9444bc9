"""Fault scenarios: safety alerts. A node killed at each step of a trigger, a resolve, an
escalation and a delivery; Redis restarted with jobs queued (providers that hang, throttle (429)
or fail (5xx): alert_providers.py, with the helpers here). Every recipient with a working route
must be notified, none twice beyond the documented window (a provider that accepted a request
whose result the node never wrote), and `alert.status` must say what happened.

The providers are the local fakes (`loadtests.fakeproviders`) reached through the real
firebase-admin and twilio SDKs; nodes are `loadtests.faults.node`, i.e. `realtime serve` with
the kill switch `RT_FAULT_KILL_AT`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from realtime_safety.alerts.plan import alert_id_for

from ..fakeproviders import FakeProviders
from ..support import free_port
from .cluster import Cluster, Proc
from .report import FaultResult, Scenario

SECRET = "faults-" + "s" * 40
API_KEY = "faults-api-key-0123456789"
HERE = {"lat": 52.52, "lon": 13.405}


# --- a client that does what an app does: retry on a new connection until answered ----------


def _token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": time.time() + 3600}, SECRET, algorithm="HS256")


async def call(url: str, user: str, op: str, **args: Any) -> dict[str, Any] | None:
    """One op on a fresh connection: the reply, or None if the connection died first."""
    try:
        async with asyncio.timeout(15):
            async with connect(url, subprotocols=["rt.v1.json"], open_timeout=3) as ws:  # type: ignore[list-item]
                await ws.send(json.dumps({"id": 1, "op": "auth", "token": _token(user)}))
                await ws.send(json.dumps({"id": 2, "op": op, **args}))
                while True:
                    frame = json.loads(await ws.recv())
                    if frame.get("id") == 2:
                        return dict(frame)
    except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake):
        return None


async def until_ok(url: str, user: str, op: str, timeout: float = 30, **args: Any) -> Any:
    """Retry (same arguments, so the same idempotency key) until the server answers ok."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await call(url, user, op, **args)
        if reply is not None and reply.get("ok"):
            return reply
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{op} never answered ok")


async def wait_until(check: Callable[[], bool | Awaitable[bool]], timeout: float) -> bool:
    """Poll `check` (sync or async) until it is true: False if `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def queues_idle(work: Path) -> bool:
    """Whether an embedded node (data in `work`/data) has no delivery job left: none queued,
    taken or waiting to retry (a job that is done has no index). With every planned delivery
    finished as well, nothing more goes to a provider: a count taken then is final."""
    db = sqlite3.connect(work / "data" / "alerts.sqlite3")
    try:
        (pending,) = db.execute(
            "SELECT count(*) FROM docs WHERE coll LIKE 'jobs:%' AND ix IS NOT NULL"
        ).fetchone()
    finally:
        db.close()
    return bool(pending == 0)


def redis_queues_idle(port: int) -> bool:
    """`queues_idle` for the Redis queues: every route's stream and retry set empty."""
    r = redis.Redis(port=port)
    try:
        return all(
            r.xlen(f"{{rt:alerts:{route}}}:jobs") == 0
            and r.zcard(f"{{rt:alerts:{route}}}:delayed") == 0
            for route in ("ws", "push", "sms")
        )
    finally:
        r.close()


def api(node: Proc, method: str, path: str, body: dict[str, Any] | None = None) -> None:
    r = httpx.request(
        method,
        f"http://127.0.0.1:{node.port}{path}",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    r.raise_for_status()


def node_env(work: Path, fakes: FakeProviders, **extra: str) -> dict[str, str]:
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env.update(
        {
            "RT_JWT_SECRET": SECRET,
            "RT_API_KEY": API_KEY,
            "RT_DATA_DIR": str(work / "data"),
            "RT_ALERT_RECONCILE_S": "1",
            "RT_ALERT_RETRY_BASE_S": "0.2",
            "RT_ALERT_LEASE_S": "2",
            "RT_ALERT_PROVIDER_TIMEOUT_S": "1",
            "PYTHONUNBUFFERED": "1",
            **fakes.env(work),
            **extra,
        }
    )
    return env


def node_proc(work: Path, env: dict[str, str], name: str = "node") -> Proc:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "realtime_safety.loadtests.faults.node",
        "serve",
        "--port",
        str(port),
    ]
    return Proc(name, [*cmd, "--log-level", "warning"], port, work / f"{name}.log", env)


def ws_url(node: Proc) -> str:
    return f"ws://127.0.0.1:{node.port}/ws"


class People:
    """An owner whose tier-1 contacts are `phones` SMS numbers and one app user (ws + push)."""

    def __init__(self, phones: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.owner = f"owner-{tag}"
        self.friend = f"friend-{tag}"
        self.token = f"tok-{tag}"
        self.phones = [f"+1555{uuid.uuid4().int % 10**7:07d}" for _ in range(phones)]

    def register(self, node: Proc) -> None:
        contacts = [{"phone": p} for p in self.phones] + [{"user": self.friend}]
        api(node, "PUT", f"/v1/users/{self.owner}/contacts", {"contacts": contacts})
        api(node, "PUT", f"/v1/users/{self.friend}/push-tokens/{self.token}", {})

    def sms_counts(self, fakes: FakeProviders) -> Counter[str]:
        sent = Counter(fakes.accepted_sms)
        return Counter({p: sent[p] for p in self.phones})


async def status_view(node: Proc, owner: str, alert_id: str) -> dict[tuple[str, str], str]:
    """(route, to) -> "status" or "status (last error)", as the owner sees it."""
    reply = await until_ok(ws_url(node), owner, "alert.status", alert_id=alert_id)
    return {
        (r["route"], r["to"]): r["status"] + (f" ({r['error']})" if r.get("error") else "")
        for r in reply["recipients"]
    }


# --- a node killed at each step ------------------------------------------------------------

# step -> SMS each phone must get in the end (alert, then the escalation resend or the
# "resolved" notice), and whether the client retries (False: the reconciler alone finishes).
KILL_STEPS: dict[str, tuple[int, bool]] = {
    "trigger:reserved": (1, True),
    "trigger:stored": (1, False),
    "trigger:queued": (1, True),
    "deliver:sent": (1, False),
    "escalate:stored": (2, False),
    "resolve:stored": (2, False),
}


async def _kill_at(step: str, work: Path, fakes: FakeProviders, phones: int) -> dict[str, Any]:
    expected, retry = KILL_STEPS[step]
    extra = {"RT_ALERT_TRIGGER_LIMIT": "1"}  # a retry that counted twice would be refused
    if step == "escalate:stored":
        # Not sooner: the step must find the alert's first sends finished and written (a send
        # in flight at the kill goes out again: the window of deliver:sent). The first send
        # through the SDKs took up to 1.6 s on a busy machine.
        extra["RT_ALERT_ESCALATE_S"] = "3"
    env = node_env(work, fakes, **extra)
    node = node_proc(work, {**env, "RT_FAULT_KILL_AT": step}, f"node-{step.replace(':', '-')}")
    people = People(phones)
    node.start()
    try:
        people.register(node)
        cid = f"press-{step}"
        alert_id = alert_id_for(people.owner, cid)
        trigger: dict[str, Any] = {"kind": "sos", "location": HERE, "client_alert_id": cid}
        await call(ws_url(node), people.owner, "alert.trigger", **trigger)
        if step == "resolve:stored":
            # Once the alert is out on every route, and written so (a push still being retried
            # would rightly be cancelled; a send not yet written would go out again).
            async def sent() -> bool:
                status = await status_view(node, people.owner, alert_id)
                routes = [("sms", p) for p in people.phones] + [("push", people.friend)]
                return all(status.get(r) == "sent" for r in routes)

            await wait_until(sent, 10)
            await call(
                ws_url(node), people.owner, "alert.resolve", alert_id=alert_id, outcome="safe"
            )
        died = await wait_until(lambda: not node.running, 10)
        node.kill()
        node.env = env  # the same node again, without the fault
        node.start()
        if retry:
            reply = await until_ok(ws_url(node), people.owner, "alert.trigger", **trigger)
            assert reply["alert_id"] == alert_id
        notified = await wait_until(
            lambda: (
                all(n >= expected for n in people.sms_counts(fakes).values())
                and fakes.accepted_push.count(people.token) >= 1
            ),
            20,
        )
        # Not a pause for duplicates to show up: wait until no job is left anywhere (a
        # second copy of a job, or one the reconciler queued again, would still be there).
        settled = await wait_until(lambda: queues_idle(work), 20)
        status = await status_view(node, people.owner, alert_id)
        counts = people.sms_counts(fakes)
        true_status = all(status.get(("sms", p)) == "sent" for p in people.phones) and status.get(
            ("push", people.friend)
        ) in ("sent", "acked")
        return {
            "died": died,
            "notified": notified,
            "settled": settled,
            "expected": expected,
            "counts": counts,
            "push": fakes.accepted_push.count(people.token),
            "true_status": true_status,
            "status": status,
        }
    finally:
        node.kill()  # thrown away: no clean shutdown needed


def kill_steps(scale: float, steps: list[str] | None = None) -> FaultResult:
    """The node killed at each of `steps` (default: all of KILL_STEPS), one fresh node each."""
    phones = max(2, int(10 * scale))
    result = FaultResult("alert-kill-steps", "node SIGKILLed at each step of an alert")
    with FakeProviders() as fakes, workdir() as work:
        for step in steps or list(KILL_STEPS):
            found = asyncio.run(_kill_at(step, work / step.replace(":", "-"), fakes, phones))
            window = 1 if step == "deliver:sent" else 0  # one request may be in flight
            expected = found["expected"]
            result.sent += len(found["counts"])
            result.acked += len(found["counts"])
            result.delivered += sum(1 for n in found["counts"].values() if n >= expected)
            result.lost += sum(1 for n in found["counts"].values() if n < expected)
            result.duplicated += sum(
                max(0, n - expected - window) for n in found["counts"].values()
            )
            result.extra[f"{step} in-window"] = sum(
                min(window, max(0, n - expected)) for n in found["counts"].values()
            )
            if not (found["died"] and found["notified"] and found["settled"]):
                found["true_status"] = False
            if not found["true_status"]:
                result.ok = False
                result.notes += f"{step}: {found}; "
        result.ok = result.ok and result.lost == 0 and result.duplicated == 0
    return result


# --- Redis restarted with jobs queued ------------------------------------------------------


async def _redis_restart(cluster: Cluster, fakes: FakeProviders, phones: int) -> dict[str, Any]:
    node = cluster.nodes[0]
    people = People(phones)
    people.register(node)
    # Every SMS fails first with 503 "retry after 3 s": the jobs wait in Redis when it dies.
    fakes.script.retry_after = "3"
    fakes.script.twilio_fail = [503] * phones
    cid = "press-redis"
    await until_ok(
        ws_url(node), people.owner, "alert.trigger", kind="sos", location=HERE, client_alert_id=cid
    )
    await wait_until(lambda: len(fakes.sms) >= phones, 10)
    cluster.redis.kill()
    cluster.redis.start()  # empty: no persistence in this scenario
    back = time.monotonic()
    notified = await wait_until(lambda: all(people.sms_counts(fakes).values()), 30)
    recovery = time.monotonic() - back
    # Counted once no job is left (the reconciler's copy and any other done).
    settled = await wait_until(lambda: redis_queues_idle(cluster.redis.port), 20)
    status = await status_view(node, people.owner, alert_id_for(people.owner, cid))
    return {
        "counts": people.sms_counts(fakes),
        "notified": notified,
        "settled": settled,
        "recovery_s": recovery,
        "true_status": all(status.get(("sms", p)) == "sent" for p in people.phones),
        "status": status,
    }


def _redis_restart_scenario(scale: float) -> FaultResult:
    phones = max(2, int(20 * scale))
    result = FaultResult("alert-redis-restart", "Redis restarted empty with SMS jobs queued")
    cluster = Cluster(nodes=1)
    with FakeProviders() as fakes:
        assert cluster.nodes[0].env is not None
        cluster.nodes[0].env.update(
            RT_API_KEY=API_KEY,
            RT_JWT_SECRET=SECRET,
            RT_ALERT_RECONCILE_S="1",
            RT_ALERT_RETRY_BASE_S="0.2",
            # A job whose `done` did not reach Redis while it came back stays leased and runs
            # again after its lease (finding its SMS sent): shorter than the 20 s settle wait.
            RT_ALERT_LEASE_S="5",
            RT_ALERT_PROVIDER_TIMEOUT_S="2",
            **fakes.env(cluster.work),
        )
        with cluster:
            found = asyncio.run(_redis_restart(cluster, fakes, phones))
    counts: Counter[str] = found["counts"]
    result.sent = result.acked = len(counts)
    result.delivered = sum(1 for n in counts.values() if n >= 1)
    result.lost = sum(1 for n in counts.values() if n < 1)
    result.duplicated = sum(max(0, n - 1) for n in counts.values())
    result.recovery_s = found["recovery_s"]
    result.ok = found["notified"] and found["settled"] and found["true_status"]
    result.ok = result.ok and not result.lost and not result.duplicated
    if not result.ok:
        result.notes = f"{found}"
    return result


class workdir:
    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="rt-alert-faults-"))
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


SCENARIOS: dict[str, Scenario] = {
    "alert-kill-steps": Scenario(
        "a node SIGKILLed at each step of trigger, delivery, escalation and resolve",
        kill_steps,
    ),
    "alert-redis-restart": Scenario(
        "Redis restarted without persistence while SMS jobs wait for a retry",
        _redis_restart_scenario,
    ),
}
