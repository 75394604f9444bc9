"""SOS works for everyone (issue 23, hole 4): a global ban ends chat, not safety. A globally
banned user still authenticates, and may trigger, update and resolve her own alerts (the SMS
reaches her contact through the real Twilio SDK and a fake Twilio); everything else stays
refused, and what she may do is what an owner may do, whatever roles her token carries."""

from __future__ import annotations

import time
import uuid

from conftest import Node, token
from wire import Raw, plain, until

from realtime_safety.loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.52, "lon": 13.405, "accuracy_m": 12.0}


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def here() -> dict[str, float]:
    return {**HERE, "ts": int(time.time() * 1000)}


async def test_a_globally_banned_user_can_still_raise_an_sos(
    alert_node: Node, fakes: FakeProviders
) -> None:
    url = alert_node.url
    gus, mia, phone = uid("gus"), uid("mia"), "+15557770001"
    public = f"public:{uid('p')}"
    r = alert_node.api("PUT", f"/v1/users/{gus}/contacts", json={"contacts": [{"phone": phone}]})
    assert r.status_code == 200, r.text
    mod = await Raw.open(url, token(mia, roles=["user", "moderator"]))
    # gus's token says moderator too: banned, he must not act as one
    gus_token = token(gus, roles=["user", "moderator"])
    before = await Raw.open(url, gus_token)
    await before.ok("publish", channel=public, client_msg_id="p0", body=plain("hi"))  # control

    await mod.ok("mod.ban", user=gus, reason="harassment")
    assert await before.close_code(10) == 4009  # the chat session ends

    raw = await Raw.open(url)
    reply = await raw.cmd("auth", token=gus_token)
    assert reply["ok"] and reply["banned"] == "harassment" and reply["roles"] == ["user"], reply
    # chat stays closed to him
    reply = await raw.cmd("publish", channel=public, client_msg_id="p1", body=plain("x"))
    assert reply["error"]["code"] == "forbidden" and "harassment" in reply["error"]["message"]
    for op, args in (
        ("subscribe", {"channel": public}),
        ("history", {"channel": public}),
        ("keys.lookup", {"users": [mia]}),
        ("mod.alerts", {}),
        ("mod.unban", {"user": gus}),
        ("presence.invisible", {"invisible": True}),
    ):
        assert await raw.error(op, **args) == "forbidden", op

    # safety does not: trigger, update, resolve, and the SMS goes out
    trigger = await raw.ok("alert.trigger", kind="sos", location=here(), client_alert_id="s1")
    alert_id = trigger["alert_id"]
    await until(lambda: fakes.sms_to(phone), what="the SOS text")
    assert (await mod.push(5))["alert_id"] == alert_id  # moderators see it as any alert
    await raw.ok("alert.location", alert_id=alert_id, location=here())
    assert (await raw.ok("alert.status", alert_id=alert_id))["state"] == "active"
    await raw.ok("alert.resolve", alert_id=alert_id, outcome="safe")
    await until(lambda: len(fakes.sms_to(phone)) == 2, what="the resolved text")

    # only his own: another user's alert is not his to resolve (his token's moderator role
    # does not count while banned), though a moderator may
    olga = await Raw.open(url, token(uid("olga")))
    other = await olga.ok("alert.trigger", kind="sos", location=here(), client_alert_id="o1")
    reply = await raw.cmd("alert.resolve", alert_id=other["alert_id"], outcome="safe")
    assert reply["error"]["code"] == "forbidden", reply
    await mod.ok("alert.resolve", alert_id=other["alert_id"], outcome="safe")

    # banned again (a longer ban, another reason): his safety-only session stays open (a
    # close 4009 is final for clients), and still only his safety ops run
    await mod.ok("mod.ban", user=gus, reason="again")
    await raw.ok("ping")
    assert await raw.error("subscribe", channel=public) == "forbidden"

    # unbanned: the same session is whole again
    await mod.ok("mod.unban", user=gus)
    await raw.ok("publish", channel=public, client_msg_id="p2", body=plain("back"))
    for c in (mod, raw, olga):
        await c.close()
