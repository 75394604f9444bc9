"""Access that ends when it should (issue 23): a contact the owner removes from their emergency
contacts while an alert is active loses it at once, on every node; and an invisible contact's
WebSocket route in `alert.status` does not tell whether they are connected. Real server
processes, real clients. Each test is the attacker's attempt (the removed contact, the owner
watching an invisible contact) beside a positive control (a contact who stays, a responder, a
moderator, a visible contact), so a refusal cannot pass because delivery is broken."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from conftest import Node, RedisServer, base_env, shared_env, token
from wire import AppDevice, Raw, b64, until

from realtime_safety.loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.52, "lon": 13.405, "accuracy_m": 12.0}
NEARBY = {"lat": 52.521, "lon": 13.406}
PIN, DURESS = "2468", "1357"


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def here() -> dict[str, float]:
    return {**HERE, "ts": int(time.time() * 1000)}


def put_contacts(node: Node, owner: str, contacts: list[dict[str, Any]]) -> None:
    r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": contacts})
    assert r.status_code == 200, r.text


def revoked(channel: str) -> dict[str, str]:
    return {"push": "unsubscribed", "channel": channel, "reason": "revoked"}


async def refusals(raw: Raw, alert_id: str) -> dict[str, str]:
    """What `raw` is answered for everything a recipient may do with an alert."""
    channel = f"alert:{alert_id}"
    ops: dict[str, dict[str, Any]] = {
        "subscribe": {"channel": channel},
        "history": {"channel": channel},
        "presence": {"channel": channel},
        "alert.trail": {"alert_id": alert_id},
        "alert.ack": {"alert_id": alert_id},
        "alert.received": {"alert_id": alert_id},
        "alert.status": {"alert_id": alert_id},
    }
    return {op: await raw.error(op, **args) for op, args in ops.items()}


async def test_a_contact_removed_mid_alert_loses_the_alert_at_once(single_node: Node) -> None:
    """eve, olga's emergency contact, watches olga's alert; olga removes her from her contacts:
    eve's subscription to `alert:<id>` ends at once (`unsubscribed`, `revoked`) and from then on
    she is answered exactly as a stranger (sam) is, for every op. The controls: bob, a contact
    who stays, keeps receiving and acting; ada, removed too but alerted as a nearby responder
    and still one, keeps it as a responder; a moderator and olga keep it; eve, added back,
    may watch again (the refusal is the removal's, not a broken subscribe)."""
    url = single_node.url
    olga, bob, eve, ada, mia, sam = (uid(n) for n in ("olga", "bob", "eve", "ada", "mia", "sam"))
    put_contacts(single_node, olga, [{"user": bob}, {"user": eve}, {"user": ada}])
    ada_ws = await Raw.open(url, token(ada, roles=["user", "responder"]))
    await ada_ws.ok("location.share", location=NEARBY)
    olga_ws = await Raw.open(url, token(olga))
    trigger = await olga_ws.ok(
        "alert.trigger", kind="sos", location=here(), client_alert_id=uid("sos")
    )
    alert_id, channel = trigger["alert_id"], trigger["channel"]
    bob_ws = await Raw.open(url, token(bob))
    eve_ws = await Raw.open(url, token(eve))
    mod = await Raw.open(url, token(mia, roles=["user", "moderator"]))
    stranger = await Raw.open(url, token(sam))
    keep = (bob_ws, ada_ws, mod, olga_ws)
    try:
        for raw in (*keep, eve_ws):
            await raw.ok("subscribe", channel=channel)
        # before: eve sees what bob sees
        await olga_ws.ok("alert.location", alert_id=alert_id, location=here())
        for raw in (*keep, eve_ws):
            assert (await raw.push(5))["push"] == "alert.location"
        assert (await eve_ws.ok("alert.trail", alert_id=alert_id))["points"]

        # olga takes eve and ada off her contacts (ada stays a responder nearby)
        put_contacts(single_node, olga, [{"user": bob}])
        # (ada's subscription is checked before eve's: had it ended, its push came first)
        assert await eve_ws.push(5) == revoked(channel)
        await olga_ws.ok("alert.location", alert_id=alert_id, location=here())
        for raw in keep:  # nothing ended for them: their next push is the new point
            assert (await raw.push(5))["push"] == "alert.location"
        await eve_ws.quiet()  # single node: hers would be queued before the reply

        # eve is a stranger to the alert now, with a stranger's answers (no existence leak)
        assert await refusals(eve_ws, alert_id) == await refusals(stranger, alert_id)
        assert set((await refusals(eve_ws, alert_id)).values()) == {"forbidden"}

        # the controls act on it: bob as a contact, ada as a responder, the moderator
        for raw in (bob_ws, ada_ws, mod):
            assert (await raw.ok("alert.trail", alert_id=alert_id))["points"]
            await raw.ok("history", channel=channel)
        await bob_ws.ok("alert.received", alert_id=alert_id)
        await ada_ws.ok("alert.received", alert_id=alert_id)
        await bob_ws.ok("alert.ack", alert_id=alert_id)
        for raw in keep:
            assert (await raw.push(5))["push"] == "alert.ack"
        await eve_ws.quiet()  # the ack's push went on alert:<id> before the reply: not to eve
        assert not [p for p in ada_ws.pushes if p.get("push") == "unsubscribed"]

        # added back, eve may watch it again
        put_contacts(single_node, olga, [{"user": bob}, {"user": eve}])
        await eve_ws.ok("subscribe", channel=channel)
        assert (await eve_ws.ok("alert.trail", alert_id=alert_id))["points"]
    finally:
        for raw in (*keep, eve_ws, stranger):
            await raw.close()


async def two_nodes_watching(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> tuple[Node, str, str, Raw, Raw, Raw, str, str]:
    """Nodes a and b on one Redis and one MongoDB; olga (on a) triggers an SOS to her
    contacts bob and eve, who watch its channel on b. Returns node a, olga, bob, their three
    connections, the alert and its channel."""
    env = shared_env(redis_server, mongo_uri)
    a = node_factory("a", RT_NODE_ID="node-a", **env)
    b = node_factory("b", RT_NODE_ID="node-b", **env)
    olga, bob, eve = uid("olga"), uid("bob"), uid("eve")
    put_contacts(a, olga, [{"user": bob}, {"user": eve}])
    olga_ws = await Raw.open(a.url, token(olga))
    trigger = await olga_ws.ok(
        "alert.trigger", kind="sos", location=here(), client_alert_id=uid("sos")
    )
    bob_ws = await Raw.open(b.url, token(bob))
    eve_ws = await Raw.open(b.url, token(eve))
    for raw in (bob_ws, eve_ws):
        await raw.ok("subscribe", channel=trigger["channel"])
    return a, olga, bob, olga_ws, bob_ws, eve_ws, trigger["alert_id"], trigger["channel"]


async def test_a_removal_ends_the_subscription_on_every_node(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> None:
    """Two nodes on one Redis and one MongoDB: olga's contacts change through node a's API;
    eve, subscribed on node b, is unsubscribed there at once and refused; bob, who stays, on
    node b too, goes on receiving the alert's live location (the control)."""
    a, olga, bob, olga_ws, bob_ws, eve_ws, alert_id, channel = await two_nodes_watching(
        node_factory, redis_server, mongo_uri
    )
    try:
        await olga_ws.ok("alert.location", alert_id=alert_id, location=here())
        for raw in (bob_ws, eve_ws):
            assert (await raw.push(5))["push"] == "alert.location"

        put_contacts(a, olga, [{"user": bob}])
        assert await eve_ws.push(5) == revoked(channel)
        assert await eve_ws.error("subscribe", channel=channel) == "forbidden"
        assert await eve_ws.error("alert.trail", alert_id=alert_id) == "forbidden"
        await olga_ws.ok("alert.location", alert_id=alert_id, location=here())
        assert (await bob_ws.push(5))["push"] == "alert.location"
        assert not [p for p in bob_ws.pushes if p.get("push") == "unsubscribed"]
        await bob_ws.ok("alert.trail", alert_id=alert_id)
    finally:
        for raw in (olga_ws, bob_ws, eve_ws):
            await raw.close()


async def test_a_removal_the_broker_lost_ends_the_subscription_once_it_is_back(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> None:
    """The removal is made while Redis is down, so its broadcast is lost: node b checks its
    sessions' alert subscriptions again when its broker is back (as it drops its membership
    cache then): eve's ends; bob's, who stays, goes on (the control)."""
    a, olga, bob, olga_ws, bob_ws, eve_ws, alert_id, channel = await two_nodes_watching(
        node_factory, redis_server, mongo_uri
    )
    try:
        redis_server.stop()
        put_contacts(a, olga, [{"user": bob}])  # stored; its broadcast cannot go out
        assert await eve_ws.error("alert.trail", alert_id=alert_id) == "forbidden"  # at once
        redis_server.start()  # same port
        assert await eve_ws.push(20) == revoked(channel)
        await olga_ws.ok("alert.location", alert_id=alert_id, location=here())
        assert (await bob_ws.push(20))["push"] == "alert.location"
        assert not [p for p in bob_ws.pushes if p.get("push") == "unsubscribed"]
    finally:
        for raw in (olga_ws, bob_ws, eve_ws):
            await raw.close()


def _alerts_node(tmp_path: Path, fakes: FakeProviders, name: str, **env: str) -> Node:
    """A node whose alerts go to `fakes` (fast retries)."""
    node = Node(
        base_env(tmp_path / name, RT_ALERT_RETRY_BASE_S="0.05", **fakes.env(tmp_path), **env),
        name,
    )
    node.env["RT_PUBLIC_URL"] = node.http
    return node.start()


async def test_a_removed_contact_is_sent_nothing_more_of_the_alert(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    """After olga removes eve and one of two phone numbers, what her alerts still send goes
    to the contacts who stay only: the live location of an alert stopped with the duress PIN
    (which goes to the recipients' own `user:` channels), and the flagged resend the duress
    PIN causes (WebSocket and SMS). bob and the number kept get both (the controls)."""
    node = _alerts_node(tmp_path, fakes, "notices")
    olga, bob, eve = uid("olga"), uid("bob"), uid("eve")
    kept, gone = (f"+1555{uuid.uuid4().int % 10**7:07d}" for _ in range(2))
    put_contacts(node, olga, [{"user": bob}, {"user": eve}, {"phone": kept}, {"phone": gone}])
    olga_ws = await Raw.open(node.url, token(olga))
    bob_ws = await Raw.open(node.url, token(bob))
    eve_ws = await Raw.open(node.url, token(eve))
    try:
        for raw, user in ((bob_ws, bob), (eve_ws, eve)):
            await raw.ok("subscribe", channel=f"user:{user}")
        await olga_ws.ok("pin.set", pin=PIN, duress_pin=DURESS)
        # `out`: out at once; `held`: a countdown stopped with the duress PIN (out at once,
        # the phone shown a cancelled alert, its live pushes on the recipients' channels)
        out = (await olga_ws.ok("alert.trigger", kind="sos", location=here(), client_alert_id="o"))[
            "alert_id"
        ]
        held = await olga_ws.ok(
            "alert.trigger", kind="sos", location=here(), client_alert_id="h", delay_s=30
        )
        reply = await olga_ws.ok("alert.cancel", alert_id=held["alert_id"], pin=DURESS)
        assert reply["state"] == "cancelled"
        for raw in (bob_ws, eve_ws):
            got = {(p["alert_id"], p["duress"]) for p in [await raw.push(5), await raw.push(5)]}
            assert got == {(out, False), (held["alert_id"], True)}
        await until(lambda: len(fakes.sms_to(gone)) == 2 and len(fakes.sms_to(kept)) == 2)

        put_contacts(node, olga, [{"user": bob}, {"phone": kept}])
        # the live location of the duress alert: to bob's own channel, not eve's
        await olga_ws.ok("alert.location", alert_id=held["alert_id"], location=here())
        assert (await bob_ws.push(5))["push"] == "alert.location"
        await eve_ws.quiet()  # single node: hers would be queued before the reply

        # the duress PIN once `out` is out: everyone it reached is told again, flagged —
        # everyone who is still a contact
        assert await olga_ws.error("alert.cancel", alert_id=out, pin=DURESS) == "conflict"
        push = await bob_ws.push(5)
        assert (push["alert_id"], push["duress"]) == (out, True)
        await until(lambda: len(fakes.sms_to(kept)) == 3, what="the flagged SMS to the kept")

        def skipped(route: str) -> bool:
            return node.metric("rt_alert_deliveries_total", route=route, outcome="cancelled") == 1

        await until(lambda: skipped("ws") and skipped("sms"), what="the notices skipped")
        await eve_ws.quiet()
        assert len(fakes.sms_to(gone)) == 2
    finally:
        for raw in (olga_ws, bob_ws, eve_ws):
            await raw.close()
        node.stop()


async def test_a_removed_contact_gets_no_fallback_sms(tmp_path: Path, fakes: FakeProviders) -> None:
    """uma and vic have the app and a phone, and neither app confirms: vic, who stays, gets the
    SMS fallback (the control); uma, removed before it was due, does not."""
    node = _alerts_node(tmp_path, fakes, "fallback", RT_ALERT_FALLBACK_S="2")
    fay, uma, vic = uid("fay"), uid("uma"), uid("vic")
    phones = {uma: "+15558100001", vic: "+15558100002"}
    put_contacts(node, fay, [{"user": u, "phone": p} for u, p in phones.items()])
    fay_ws = await Raw.open(node.url, token(fay))
    try:
        alert_id = (
            await fay_ws.ok("alert.trigger", kind="sos", location=here(), client_alert_id="f")
        )["alert_id"]

        async def first_sends() -> bool:  # each fallback is armed before its first send
            status = await fay_ws.ok("alert.status", alert_id=alert_id)
            ws = [r for r in status["recipients"] if r["route"] == "ws"]
            return len(ws) == 2 and all(r["status"] == "offline" for r in ws)

        await until(first_sends, what="the WebSocket sends")
        put_contacts(node, fay, [{"user": vic, "phone": phones[vic]}])
        await until(
            lambda: (
                fakes.sms_to(phones[vic])
                and node.metric("rt_alert_fallbacks_total", outcome="not_needed") == 1
            ),
            20,
            what="vic's fallback SMS and uma's settled fallback",
        )
        assert not fakes.sms_to(phones[uma])
        assert node.metric("rt_alert_fallbacks_total", outcome="sms") == 1
    finally:
        await fay_ws.close()
        node.stop()


async def test_an_invisible_contact_never_shows_offline(node_factory: Any) -> None:
    """olga's alert.status must not tell whether her invisible contacts are connected: ivy
    (invisible, not connected) and ian (invisible, connected) both show `sent` on the
    WebSocket route, until ivy's own receipt makes hers `delivered`; dan (visible, not
    connected) still shows `offline` (the control: the status still tells what it may)."""
    node = node_factory("invisible")
    url = node.url
    olga, ivy, ian, dan = uid("olga"), uid("ivy"), uid("ian"), uid("dan")
    put_contacts(node, olga, [{"user": u} for u in (ivy, ian, dan)])
    ivy_ws = await Raw.open(url, token(ivy))
    await ivy_ws.ok("presence.invisible", invisible=True)
    await ivy_ws.close()
    ian_ws = await Raw.open(url, token(ian))
    await ian_ws.ok("presence.invisible", invisible=True)
    olga_ws = await Raw.open(url, token(olga))
    # ivy's connection has ended on the server (and her presence with it)
    await until(lambda: node.connections() == 2, what="ivy's connection to end")
    try:
        alert_id = (
            await olga_ws.ok("alert.trigger", kind="sos", location=here(), client_alert_id="i")
        )["alert_id"]

        async def ws_routes() -> dict[str, str] | None:
            status = await olga_ws.ok("alert.status", alert_id=alert_id)
            found = {r["to"]: r["status"] for r in status["recipients"] if r["route"] == "ws"}
            return found if "queued" not in found.values() and len(found) == 3 else None

        assert await until(ws_routes, what="the sends") == {
            ivy: "sent",
            ian: "sent",
            dan: "offline",
        }
        ivy_ws = await Raw.open(url, token(ivy))
        await ivy_ws.ok("alert.received", alert_id=alert_id)
        assert (await ws_routes() or {}).get(ivy) == "delivered"
    finally:
        for raw in (ivy_ws, ian_ws, olga_ws):
            await raw.close()


async def test_members_report_keys_and_presence_outside_rooms_follow_the_table(
    single_node: Node,
) -> None:
    """The README table's cells outside rooms (rooms: tests/test_access_bans.py) for
    `presence`, `report`, `keys.fetch`, `members` and `keys.share`: on `user:<id>` only `<id>`
    (here: no room mate, no contact), on `alert:<id>` the owner, the people alerted and
    moderators, on `public:` anyone; a stranger is `forbidden` where the others pass (the
    control: a `report` and a `keys.fetch` let through end `not_found`, no such message or key
    yet). `members` is `bad_request` outside rooms; `keys.share` is `forbidden` where only the
    server publishes, and open to anyone on `public:`; `typing` and `read` as the table says."""
    url = single_node.url
    olga, bob, sam, mia = uid("olga"), uid("bob"), uid("sam"), uid("mia")
    put_contacts(single_node, olga, [{"user": bob}])
    raws = {u: await Raw.open(url, token(u)) for u in (olga, bob, sam)}
    raws[mia] = await Raw.open(url, token(mia, roles=["user", "moderator"]))
    devices = {u: AppDevice(uid(u)) for u in raws}
    for u, raw in raws.items():
        await devices[u].register(raw, u)
    trigger = await raws[olga].ok(
        "alert.trigger", kind="sos", location=here(), client_alert_id=uid("sos")
    )
    alert, own, public = trigger["channel"], f"user:{olga}", f"public:{uid('p')}"

    async def answers(user: str, channel: str) -> dict[str, str]:
        raw, device = raws[user], devices[user].keys.device
        tries: dict[str, dict[str, Any]] = {
            "presence": {},
            "report": {"seq": 1, "reason": "spam"},
            "keys.fetch": {"device": device},
        }
        out = {}
        for op, args in tries.items():
            reply = await raw.cmd(op, channel=channel, **args)
            out[op] = "ok" if reply["ok"] else reply["error"]["code"]
        return out

    allowed = {"presence": "ok", "report": "not_found", "keys.fetch": "not_found"}
    refused = dict.fromkeys(allowed, "forbidden")
    try:
        assert await answers(olga, own) == allowed
        assert await answers(sam, own) == refused
        for user in (olga, bob, mia):
            assert await answers(user, alert) == allowed, user
        assert await answers(sam, alert) == refused
        for user in (olga, sam):
            assert await answers(user, public) == allowed, user
        for channel in (own, alert, public):
            for user in (olga, mia):
                assert await raws[user].error("members", channel=channel) == "bad_request"

        def sealed(user: str) -> dict[str, Any]:
            box: dict[str, Any] = b64({user: {devices[user].keys.device: os.urandom(80)}})
            return box

        for channel in (own, alert):
            for user in (olga, mia):
                reply = await raws[user].cmd(
                    "keys.share", channel=channel, key_id="k1", sealed=sealed(bob)
                )
                assert reply["error"]["code"] == "forbidden", (channel, user, reply)
        await raws[sam].ok("keys.share", channel=public, key_id="k1", sealed=sealed(olga))

        # typing: nobody on `user:` and `alert:`; read: `<id>` on `user:<id>`, nobody on alerts
        await raws[olga].ok("read", channel=own, seq=1)
        assert await raws[sam].error("read", channel=own, seq=1) == "forbidden"
        for channel in (own, alert):
            for user in (olga, mia):
                assert await raws[user].error("typing", channel=channel) == "forbidden"
        for user in (olga, bob, mia):
            assert await raws[user].error("read", channel=alert, seq=1) == "forbidden"
    finally:
        for raw in raws.values():
            await raw.close()
