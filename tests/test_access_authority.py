"""Access that ends when it should (issue 23, hole 1): a `refresh` with a token of fewer roles
ends what the old roles held. Each test is the attacker's attempt (an ex-moderator, an
ex-responder, a stolen token of another user) with a positive control beside it: a second
session with the role keeps receiving, so a refusal cannot pass because delivery is broken."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Node, SecantusServer, token, unique_db
from wire import Raw, plain, until

HERE = {"lat": 52.52, "lon": 13.405, "accuracy_m": 12.0}
NEARBY = {"lat": 52.521, "lon": 13.406}


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def here() -> dict[str, float]:
    return {**HERE, "ts": int(time.time() * 1000)}


async def test_a_demoted_moderator_loses_watches_and_alert_channels(single_node: Node) -> None:
    url = single_node.url
    mia, max_ = uid("mia"), uid("max")
    tag = uid("w")
    room, pattern, public = f"public:{tag}-room", f"public:{tag}-*", f"public:{uid('p')}"
    alice, olga = uid("alice"), uid("olga")
    ex = await Raw.open(url, token(mia, roles=["user", "moderator"]))
    still = await Raw.open(url, token(max_, roles=["user", "moderator"]))  # the control
    alice_ws = await Raw.open(url, token(alice))
    olga_ws = await Raw.open(url, token(olga))
    trigger = await olga_ws.ok(
        "alert.trigger", kind="sos", location=here(), client_alert_id=uid("sos")
    )
    alert = trigger["channel"]
    for mod in (ex, still):
        await mod.ok("mod.watch", pattern=pattern)
        await mod.ok("subscribe", channel=alert)
    await ex.ok("subscribe", channel=public)  # allowed to any user: it stays

    # before: the moderator sees the watched room and the live location
    await alice_ws.ok("publish", channel=room, client_msg_id="m1", body=plain("one"))
    await olga_ws.ok("alert.location", alert_id=trigger["alert_id"], location=here())
    for mod in (ex, still):
        got = [await mod.push(5) for _ in range(2)]
        got = [p for p in got if p["push"] != "alert"]  # the moderators' alert push
        while len(got) < 2:
            got.append(await mod.push(5))
        assert {p["push"] for p in got} == {"message", "alert.location"}, got

    # the backend demotes her; the app refreshes with a user-only token
    reply = await ex.cmd("refresh", token=token(mia, roles=["user"]))
    assert reply["ok"] and reply["roles"] == ["user"], reply
    ended = ex.pushes[:]
    ex.pushes.clear()
    assert {"push": "unsubscribed", "channel": alert, "reason": "revoked"} in ended, ended
    assert {"push": "mod.unwatched", "patterns": [pattern], "reason": "revoked"} in ended
    assert not [p for p in ended if p.get("channel") == public]  # kept

    # after: the control still gets both; the ex-moderator neither (single node: fan-out is
    # a direct call, so by the time the control has them, hers would be queued before a ping)
    await alice_ws.ok("publish", channel=room, client_msg_id="m2", body=plain("two"))
    await olga_ws.ok("alert.location", alert_id=trigger["alert_id"], location=here())
    got = {(await still.push(5))["push"] for _ in range(2)}
    assert got == {"message", "alert.location"}
    await ex.quiet()
    # and she cannot take them back
    assert await ex.error("subscribe", channel=alert) == "forbidden"
    assert await ex.error("mod.watch", pattern=pattern) == "forbidden"
    # the subscription she is still entitled to still delivers
    await alice_ws.ok("publish", channel=public, client_msg_id="p1", body=plain("hi"))
    assert (await ex.push(5))["channel"] == public
    for raw in (ex, still, alice_ws, olga_ws):
        await raw.close()


async def test_a_refresh_with_the_same_roles_keeps_everything(single_node: Node) -> None:
    """The control for the above: a moderator refreshing as a moderator loses nothing."""
    url = single_node.url
    mia, olga = uid("mia"), uid("olga")
    mod = await Raw.open(url, token(mia, roles=["user", "moderator"]))
    olga_ws = await Raw.open(url, token(olga))
    trigger = await olga_ws.ok(
        "alert.trigger", kind="sos", location=here(), client_alert_id=uid("sos")
    )
    assert (await mod.push(5))["push"] == "alert"
    await mod.ok("subscribe", channel=trigger["channel"])
    await mod.ok("mod.watch", pattern="room:*")
    reply = await mod.ok("refresh", token=token(mia, roles=["user", "moderator"]))
    assert reply["roles"] == ["moderator", "user"]
    await mod.quiet()  # no unsubscribed, no mod.unwatched
    assert (await mod.ok("mod.unwatch", pattern="room:*"))["patterns"] == []
    await olga_ws.ok("alert.location", alert_id=trigger["alert_id"], location=here())
    assert (await mod.push(5))["push"] == "alert.location"
    await mod.close()
    await olga_ws.close()


async def pushes_of(raw: Raw, kinds: set[str]) -> set[str]:
    """The next pushes of these kinds, one each (the moderators' `alert` push set aside)."""
    got: set[str] = set()
    while got != kinds:
        push = (await raw.push(10))["push"]
        if push != "alert":
            assert push in kinds and push not in got, push
            got.add(push)
    return got


@pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URI")),
    reason="pauses its own local MongoDB stand-in; cannot pause MONGODB_URI",
)
async def test_a_refresh_the_store_cannot_answer_is_unavailable_and_changes_nothing(
    node_factory: Any, tmp_path: Path
) -> None:
    """A demoted moderator's refresh comes while the store does not answer (its MongoDB
    stand-in stopped with SIGSTOP): re-checking her alert subscription needs the alert, so
    the refresh is `unavailable` and nothing moved: once the store is back she is still a
    moderator with her watch and her alert. The same refresh with the store back takes them
    away; max, a moderator throughout, is the control. (The token's own checks are answered
    from the node's cache, filled by her `auth`: what waits on the store is the re-check; with
    the re-check left out, this refresh succeeds.)"""
    mongo = SecantusServer(tmp_path / "mongo")
    mongo.start()
    try:
        node: Node = node_factory(
            "paused", RT_MONGODB_URI=mongo.uri, RT_MONGODB_DB=unique_db(), RT_STORE_TIMEOUT_S="3"
        )
        url = node.url
        mia, max_, alice, olga = uid("mia"), uid("max"), uid("alice"), uid("olga")
        tag = uid("w")
        room, pattern, later = f"public:{tag}-room", f"public:{tag}-*", f"public:{tag}x-*"
        ex = await Raw.open(url, token(mia, roles=["user", "moderator"]))
        still = await Raw.open(url, token(max_, roles=["user", "moderator"]))
        alice_ws = await Raw.open(url, token(alice))
        olga_ws = await Raw.open(url, token(olga))
        trigger = await olga_ws.ok(
            "alert.trigger", kind="sos", location=here(), client_alert_id=uid("sos")
        )
        alert, alert_id = trigger["channel"], trigger["alert_id"]
        for mod in (ex, still):
            await mod.ok("mod.watch", pattern=pattern)
            await mod.ok("subscribe", channel=alert)

        async def both_arrive(*mods: Raw) -> None:
            """A message in the watched room and the alert's live location, to each of `mods`."""
            await alice_ws.ok("publish", channel=room, client_msg_id=uid("m"), body=plain("hi"))
            await olga_ws.ok("alert.location", alert_id=alert_id, location=here())
            for mod in mods:
                assert await pushes_of(mod, {"message", "alert.location"})

        await both_arrive(ex, still)
        assert mongo.proc is not None
        mongo.proc.send_signal(signal.SIGSTOP)  # each store call now waits out its 3 s
        try:
            reply = await ex.cmd("refresh", token=token(mia, roles=["user"]), timeout=30)
        finally:
            mongo.proc.send_signal(signal.SIGCONT)
        assert reply["error"]["code"] == "unavailable", reply

        async def ready() -> bool:
            r = await asyncio.to_thread(httpx.get, node.http + "/readyz", timeout=10)
            return r.status_code == 200

        await until(ready, 30, what="the store to answer again")
        # nothing moved: no push ended anything, she still receives both, and she is still a
        # moderator (a second watch pattern is hers to make)
        assert not [p for p in ex.pushes if p["push"] in ("unsubscribed", "mod.unwatched")]
        await both_arrive(ex, still)
        await ex.ok("mod.watch", pattern=later)
        assert await ex.error("subscribe", channel=alert) == "conflict"  # still subscribed

        # the same refresh, the store answering: now it takes them away
        reply = await ex.ok("refresh", token=token(mia, roles=["user"]))
        assert reply["roles"] == ["user"], reply
        ended = ex.pushes[:]
        ex.pushes.clear()
        assert {"push": "unsubscribed", "channel": alert, "reason": "revoked"} in ended, ended
        unwatched = [p for p in ended if p["push"] == "mod.unwatched"]
        assert len(unwatched) == 1 and sorted(unwatched[0]["patterns"]) == sorted(
            [pattern, later]
        ), ended
        assert unwatched[0]["reason"] == "revoked"
        await both_arrive(still)  # the control has both; she has neither (one node: direct)
        await ex.quiet()
        assert await ex.error("mod.watch", pattern=pattern) == "forbidden"
        for raw in (ex, still, alice_ws, olga_ws):
            await raw.close()
    finally:
        await asyncio.to_thread(mongo.stop)


async def test_a_refresh_for_another_user_is_refused_and_changes_nothing(
    single_node: Node,
) -> None:
    url = single_node.url
    ivy, eve = uid("ivy"), uid("eve")
    own = f"user:{ivy}"
    raw = await Raw.open(url, token(ivy))
    await raw.ok("subscribe", channel=own)
    # eve's token (say, stolen by ivy) does not turn ivy's session into eve's
    reply = await raw.cmd("refresh", token=token(eve, roles=["user", "moderator"]))
    assert reply["error"]["code"] == "forbidden", reply
    assert await raw.error("subscribe", channel=f"user:{eve}") == "forbidden"
    assert await raw.error("mod.watch", pattern="*") == "forbidden"
    # nor does a token that does not verify
    assert (await raw.cmd("refresh", token="x.y.z"))["error"]["code"] == "unauthorized"
    await raw.quiet()  # ivy's subscription did not end: nothing was revoked
    assert await raw.error("subscribe", channel=own) == "conflict"  # still subscribed
    await raw.close()


async def test_a_demoted_responder_loses_the_responder_role(single_node: Node) -> None:
    url = single_node.url
    rita = uid("rita")
    raw = await Raw.open(url, token(rita, roles=["user", "responder"]))
    await raw.ok("location.share", location=NEARBY)  # the control: allowed as a responder
    reply = await raw.ok("refresh", token=token(rita, roles=["user"]))
    assert reply["roles"] == ["user"]
    assert await raw.error("location.share", location=NEARBY) == "forbidden"
    await raw.close()


async def test_a_demoted_responder_loses_the_alerts_a_responder_sees(single_node: Node) -> None:
    """Alerted as a nearby responder, rita may watch the alert only while she is one; cleo, a
    contact of the owner who is also a responder, keeps it as a contact (the control)."""
    url = single_node.url
    rita, olga, cleo = uid("rita"), uid("olga"), uid("cleo")
    r = single_node.api("PUT", f"/v1/users/{olga}/contacts", json={"contacts": [{"user": cleo}]})
    assert r.status_code == 200, r.text
    raw = await Raw.open(url, token(rita, roles=["user", "responder"]))
    contact = await Raw.open(url, token(cleo, roles=["user", "responder"]))
    await raw.ok("subscribe", channel=f"user:{rita}")
    await raw.ok("location.share", location=NEARBY)
    await contact.ok("location.share", location=NEARBY)
    olga_ws = await Raw.open(url, token(olga))
    trigger = await olga_ws.ok(
        "alert.trigger", kind="sos", location=here(), client_alert_id=uid("sos")
    )
    assert (await raw.push(5))["alert_id"] == trigger["alert_id"]  # alerted as a responder
    await raw.ok("subscribe", channel=trigger["channel"])
    await contact.ok("subscribe", channel=trigger["channel"])
    try:
        await raw.ok("refresh", token=token(rita, roles=["user"]))
        assert {
            "push": "unsubscribed",
            "channel": trigger["channel"],
            "reason": "revoked",
        } in raw.pushes
        assert await raw.error("subscribe", channel=trigger["channel"]) == "forbidden"
        await contact.ok("refresh", token=token(cleo, roles=["user"]))
        assert not [p for p in contact.pushes if p.get("push") == "unsubscribed"]
        await contact.ok("unsubscribe", channel=trigger["channel"])
        await contact.ok("subscribe", channel=trigger["channel"])  # still hers, as a contact
    finally:
        for ws in (raw, contact, olga_ws):
            await ws.close()


async def test_a_demoted_responder_is_no_longer_alerted_as_one(single_node: Node) -> None:
    """The role dropped on refresh also takes rita out of the nearby responders at once (not
    when her last shared location would have expired); ron, still a responder, is alerted
    (the control)."""
    url = single_node.url
    rita, ron, olga, mia = uid("rita"), uid("ron"), uid("olga"), uid("mia")
    raw = await Raw.open(url, token(rita, roles=["user", "responder"]))
    other = await Raw.open(url, token(ron, roles=["user", "responder"]))
    await raw.ok("location.share", location=NEARBY)
    await other.ok("location.share", location=NEARBY)
    await raw.ok("refresh", token=token(rita, roles=["user"]))
    olga_ws = await Raw.open(url, token(olga))
    mod = await Raw.open(url, token(mia, roles=["user", "moderator"]))
    try:
        trigger = await olga_ws.ok(
            "alert.trigger", kind="sos", location=here(), client_alert_id=uid("sos")
        )
        status = await mod.ok("alert.status", alert_id=trigger["alert_id"])
        told = {r["to"] for r in status["recipients"] if r["route"] == "ws"}
        assert ron in told and rita not in told, status
    finally:
        for ws in (raw, other, olga_ws, mod):
            await ws.close()


async def test_revoked_tokens_end_the_sessions_and_are_refused(single_node: Node) -> None:
    """The app's backend revokes mia's tokens (a demoted moderator who kept the old one):
    her session closes 4003 at once, the old token is refused on auth and on refresh, a token
    issued afterwards works; ivy's session is untouched (the control)."""
    url = single_node.url
    mia, ivy = uid("mia"), uid("ivy")
    old = token(mia, roles=["user", "moderator"], iat=int(time.time()) - 5)
    raw = await Raw.open(url, old)
    other = await Raw.open(url, token(ivy))
    spare = await Raw.open(url, token(mia, iat=int(time.time()) - 5))
    r = single_node.api("POST", f"/v1/users/{mia}/tokens/revoke")
    assert r.status_code == 200, r.text
    before = r.json()["revoked_before"]
    assert await raw.close_code() == 4003
    assert await spare.close_code() == 4003
    again = await Raw.open(url)
    reply = await again.cmd("auth", token=old)
    assert reply["error"] == {"code": "unauthorized", "message": "token revoked"}
    assert await again.close_code() == 4003
    fresh = await Raw.open(url, token(mia, iat=before))  # issued after the revocation
    refused = await fresh.cmd("refresh", token=old)
    assert refused["error"]["code"] == "unauthorized", refused
    await fresh.ok("ping")
    await other.ok("ping")  # ivy's session is untouched
    unknown = single_node.api("POST", "/v1/users/not%20a%20user/tokens/revoke")
    assert unknown.status_code == 400, unknown.text
    for ws in (fresh, other):
        await ws.close()
