"""Gaps found by mutation testing (scripts/mutate moderation, issue 24): the replies, limits and
side effects of the `mod.*` ops and `report` that the other moderation tests left unchecked,
through real server processes."""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from conftest import Node, RedisServer, token, unique_db
from wire import Raw, plain, until

TEN_YEARS_S = 10 * 365 * 86400


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def moderator(node: Node) -> Raw:
    return await Raw.open(node.url, token(uid("mia"), roles=["user", "moderator"]))


async def test_reports_are_listed_by_state_and_resolving_is_audited(single_node: Node) -> None:
    """`mod.reports {state: actioned}` lists the actioned reports, each with every field, and
    `mod.resolve_report` is in the audit log (mutants: moderation/ops.py, 'actioned' in the
    state check; the audit call of resolve_report removed)."""
    user = uid("rex")
    ch = f"public:{uid('r')}"
    rex = await Raw.open(single_node.url, token(user))
    for cmid in ("a", "b"):
        await rex.ok("publish", channel=ch, client_msg_id=cmid, body=plain(f"spam {cmid}"))
    first = (await rex.ok("report", channel=ch, seq=1, reason="spam one"))["report_id"]
    second = (await rex.ok("report", channel=ch, seq=2, reason="spam two"))["report_id"]
    actor = uid("mia")
    mod = await Raw.open(single_node.url, token(actor, roles=["user", "moderator"]))
    before = int(time.time() * 1000)
    reply = await mod.ok("mod.resolve_report", report_id=first, state="actioned")
    assert (reply["report_id"], reply["state"]) == (first, "actioned")
    await mod.ok("mod.resolve_report", report_id=second, state="dismissed")

    actioned = (await mod.ok("mod.reports", state="actioned"))["reports"]
    mine = [r for r in actioned if r["id"] == first]
    assert len(mine) == 1 and second not in [r["id"] for r in actioned]
    listed = mine[0]
    assert listed["ts"] <= before
    assert {k: v for k, v in listed.items() if k != "ts"} == {
        "id": first,
        "channel": ch,
        "seq": 1,
        "reporter": user,
        "sender": user,
        "reason": "spam one",
        "text": None,
        "verified": False,
        "state": "actioned",
    }
    assert first not in [r["id"] for r in (await mod.ok("mod.reports"))["reports"]]  # not open
    assert await mod.error("mod.reports", state="closed") == "bad_request"

    entries = (await mod.ok("mod.audit", since=before))["entries"]
    resolved = [
        (e["actor"], e["report_id"], e["state"])
        for e in entries
        if e["action"] == "resolve_report" and e["report_id"] in (first, second)
    ]
    assert resolved == [(actor, first, "actioned"), (actor, second, "dismissed")]
    assert all(before <= e["ts"] <= time.time() * 1000 for e in entries)
    for r in (rex, mod):
        await r.close()


async def test_delete_replies_with_the_channel_and_seq(single_node: Node) -> None:
    """`mod.delete` answers `{ok, channel, seq}` (mutant: moderation/service.py, the reply's
    'channel' key renamed)."""
    ch = f"public:{uid('d')}"
    pub = await Raw.open(single_node.url, token(uid("pat")))
    await pub.ok("publish", channel=ch, client_msg_id="x", body=plain("rude"))
    mod = await moderator(single_node)
    reply = await mod.ok("mod.delete", channel=ch, seq=1, reason="rude")
    assert {k: v for k, v in reply.items() if k not in ("id", "ok")} == {"channel": ch, "seq": 1}
    for r in (pub, mod):
        await r.close()


async def test_ban_durations_are_1_s_to_10_years(single_node: Node) -> None:
    """`duration_s` is 1 s to 10 years (10 * 365 days) and `until` is that long from now, in
    ms (mutants: moderation/service.py, 365 -> 366 in the bound; `_now()` scaled by 1001)."""
    mod = await moderator(single_node)
    user = uid("bert")
    ch = f"public:{uid('b')}"
    for bad in (0, TEN_YEARS_S + 1, True, 1.5, "60"):
        reply = await mod.cmd("mod.ban", user=user, channel=ch, duration_s=bad, reason="r")
        assert reply["error"]["code"] == "bad_request", bad
    for duration in (TEN_YEARS_S, 1):
        before = int(time.time() * 1000)
        ban = await mod.ok("mod.ban", user=user, channel=ch, duration_s=duration, reason="r")
        after = int(time.time() * 1000)
        assert before + duration * 1000 <= ban["until"] <= after + duration * 1000, duration
    await mod.close()


async def test_a_banned_user_is_told_the_reason(single_node: Node) -> None:
    """The `forbidden` answer to a banned user carries the ban's reason, for a channel ban
    and for a global ban (in `auth`'s answer, and on every op but the alert ops) (mutant:
    moderation/service.py, `return cached[1]` with 2: the ban's cache expiry instead of its
    reason)."""
    mod = await moderator(single_node)
    user = uid("carl")
    ch = f"public:{uid('c')}"
    raw = await Raw.open(single_node.url, token(user))
    await mod.ok("mod.ban", user=user, channel=ch, reason="spamming links")
    reply = await raw.cmd("subscribe", channel=ch)
    assert reply["error"]["code"] == "forbidden"
    assert "spamming links" in reply["error"]["message"], reply
    await mod.ok("mod.ban", user=user, reason="threats")
    assert await raw.close_code(10) == 4009
    again = await Raw.open(single_node.url)
    reply = await again.cmd("auth", token=token(user))
    assert reply["ok"] and reply["banned"] == "threats", reply  # alert ops only
    reply = await again.cmd("subscribe", channel=ch)
    assert reply["error"]["code"] == "forbidden"
    assert "threats" in reply["error"]["message"], reply
    await again.close()
    await mod.close()


async def _mod_stream_subscribers(redis_url: str) -> int:
    client = aioredis.from_url(redis_url)
    try:
        counts: list[tuple[bytes | str, int]] = await client.pubsub_numsub("rt:mod")
        return counts[0][1]
    finally:
        await client.aclose()


async def test_the_moderation_stream_is_dropped_when_the_last_watcher_leaves(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> None:
    """A watcher that disconnects stops watching: once the node's last watcher is gone it no
    longer subscribes to the moderation stream (mutant: moderation/service.py, `forget`'s
    unwatch removed)."""
    node = node_factory(
        "m", RT_REDIS_URL=redis_server.url, RT_MONGODB_URI=mongo_uri, RT_MONGODB_DB=unique_db()
    )

    async def subscribed(n: int) -> bool:
        return await _mod_stream_subscribers(redis_server.url) == n

    assert await subscribed(0)
    first, second = await moderator(node), await moderator(node)
    await first.ok("mod.watch", pattern="public:*")
    await second.ok("mod.watch", pattern="public:w-*")
    await until(lambda: subscribed(1), 10, what="the node to subscribe to rt:mod")
    await first.close()
    # the other watcher keeps the stream: still subscribed, still told
    pub = await Raw.open(node.url, token(uid("pub")))
    ch = f"public:w-{uid('x')}"
    await pub.ok("publish", channel=ch, client_msg_id="w", body=plain("w"))
    assert (await second.push())["channel"] == ch
    assert await subscribed(1)
    await second.close()
    await until(lambda: subscribed(0), 10, what="the node to unsubscribe from rt:mod")
    await pub.close()
