"""Issue 23, part B: presence that only the right people see, on real nodes and real clients.

Each test is an attacker's attempt with a positive control beside it, so a refusal cannot pass
because the feature is simply broken:
- a stalker (no shared room, not an emergency contact, not a moderator) cannot learn whether
  a user is online, while the user's room mate, emergency contact and a moderator can, and
  access ends when the membership or the contact does;
- an invisible user is invisible in every namespace: no join/leave pushes, not listed, not
  counted, while a visible user in the same channel is (and the invisible user still sees
  themself).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Node, RedisServer, base_env, token, unique_db
from wire import Raw, sentinel

from realtime_safety.realtime import config


def name(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:6]}"


async def online(raw: Raw, user: str) -> list[str]:
    reply = await raw.ok("presence", channel=f"user:{user}")
    return [m["user"] for m in reply["members"]]


async def presence_push(raw: Raw) -> tuple[str, str]:
    push = await raw.push(10, presence=True)
    return push["push"], push["user"]


def put(node: Node, method: str, path: str, **kw: Any) -> None:
    r = node.api(method, path, **kw)
    assert r.status_code in (200, 201, 204), r.text


@pytest.fixture(params=["sqlite", "mongodb"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The relation "shares a room" is read from either store."""
    if request.param == "sqlite":
        return {}
    uri = request.getfixturevalue("mongo_uri")
    return {"RT_MONGODB_URI": uri, "RT_MONGODB_DB": unique_db()}


async def test_a_stalker_cannot_see_whether_a_user_is_online(
    node_factory: Any, store_env: dict[str, str]
) -> None:
    node: Node = node_factory("n", **store_env)
    vic, mate, friend, stalker, away = (name(k) for k in ("vic", "mate", "friend", "x", "away"))
    shared, other = f"room:{name('home')}", f"room:{name('elsewhere')}"
    for room, user in ((shared, vic), (shared, mate), (other, stalker), (other, away)):
        await asyncio.to_thread(node.add_member, room, user)
    await asyncio.to_thread(
        put, node, "PUT", f"/v1/users/{vic}/contacts", json={"contacts": [{"user": friend}]}
    )
    victim = await Raw.open(node.url, token(vic))
    watchers = {who: await Raw.open(node.url, token(who)) for who in (mate, friend, stalker, away)}
    moderator = await Raw.open(node.url, token(name("mod"), ["user", "moderator"]))

    # positive controls: the user, a room mate, an emergency contact, a moderator
    assert await online(victim, vic) == [vic]
    assert await online(watchers[mate], vic) == [vic]
    assert await online(watchers[friend], vic) == [vic]
    assert await online(moderator, vic) == [vic]
    # the stalker (in another room, not a contact) learns nothing, online or not
    x = watchers[stalker]
    assert await x.error("presence", channel=f"user:{vic}") == "forbidden"
    assert await x.error("presence", channel=f"user:{name('offline')}") == "forbidden"
    assert await x.error("subscribe", channel=f"user:{vic}") == "forbidden"
    assert await online(watchers[away], stalker) == [stalker]  # the stalker's own room mate

    # access ends with the membership and with the contact
    await asyncio.to_thread(put, node, "DELETE", f"/v1/channels/{shared}/members/{mate}")
    assert await watchers[mate].error("presence", channel=f"user:{vic}") == "forbidden"
    await asyncio.to_thread(
        put, node, "PUT", f"/v1/users/{vic}/contacts", json={"contacts": [{"phone": "+15550100"}]}
    )
    assert await watchers[friend].error("presence", channel=f"user:{vic}") == "forbidden"
    assert await online(moderator, vic) == [vic]
    for r in (victim, moderator, *watchers.values()):
        await r.close()


async def test_the_old_rule_is_a_deployment_choice(node_factory: Any) -> None:
    """`RT_PRESENCE_VISIBILITY=everyone`: anyone may ask (the behaviour before issue 23);
    an invisible user is still hidden."""
    node: Node = node_factory("n", RT_PRESENCE_VISIBILITY="everyone")
    vic, stranger = name("vic"), name("stranger")
    victim = await Raw.open(node.url, token(vic))
    other = await Raw.open(node.url, token(stranger))
    assert await online(other, vic) == [vic]
    await victim.ok("presence.invisible", invisible=True)
    assert await online(other, vic) == []
    for r in (victim, other):
        await r.close()


async def _invisible_in_a_public_channel(watch_node: Node, ghost_node: Node) -> None:
    ch = f"public:{name('square')}"
    ghost_name, seen_name, watcher_name = name("ghost"), name("seen"), name("watcher")
    watcher = await Raw.open(watch_node.url, token(watcher_name))
    await watcher.ok("subscribe", channel=ch)
    ghost = await Raw.open(ghost_node.url, token(ghost_name))
    await ghost.ok("presence.invisible", invisible=True)
    await ghost.ok("subscribe", channel=ch)
    seen = await Raw.open(ghost_node.url, token(seen_name))
    await seen.ok("subscribe", channel=ch)
    # the first presence push the watcher gets is the visible user's join, not the ghost's
    push = await watcher.push(10, presence=True)
    assert (push["push"], push["user"]) == ("join", seen_name), push

    reply = await watcher.ok("presence", channel=ch)
    assert sorted(m["user"] for m in reply["members"]) == sorted([seen_name, watcher_name])
    assert reply["total"] == 2
    mine = await ghost.ok("presence", channel=ch)  # the ghost still sees themself
    assert ghost_name in [m["user"] for m in mine["members"]] and mine["total"] == 3

    # leaving: the ghost goes silently, the visible user does not
    await ghost.ok("unsubscribe", channel=ch)
    await seen.ok("unsubscribe", channel=ch)
    push = await watcher.push(10, presence=True)
    assert (push["push"], push["user"]) == ("leave", seen_name), push
    await watcher.nothing_before(await sentinel(watcher, ch), presence=True)
    for r in (watcher, ghost, seen):
        await r.close()


async def test_an_invisible_user_is_invisible_in_a_public_channel(node_factory: Any) -> None:
    node: Node = node_factory("n")
    await _invisible_in_a_public_channel(node, node)


async def test_an_invisible_user_is_invisible_across_nodes(
    node_factory: Any, redis_server: RedisServer, mongo_uri: str
) -> None:
    env = {"RT_REDIS_URL": redis_server.url, "RT_MONGODB_URI": mongo_uri}
    env["RT_MONGODB_DB"] = unique_db()
    a: Node = node_factory("a", RT_NODE_ID="a", **env)
    b: Node = node_factory("b", RT_NODE_ID="b", **env)
    await _invisible_in_a_public_channel(a, b)
    # more invisible users than members (the store reads the members, not the invisible set)
    ghosts = [name("g1"), name("g2")]
    raws = [await Raw.open(b.url, token(g)) for g in ghosts]
    for raw in raws:
        await raw.ok("presence.invisible", invisible=True)
    moderator = await Raw.open(a.url, token(name("mod"), ["user", "moderator"]))
    reply = await moderator.ok("presence", channel=f"user:{ghosts[0]}")
    assert reply["members"] == [] and reply["total"] == 0
    assert await online(raws[0], ghosts[0]) == [ghosts[0]]
    await raws[1].ok("presence.invisible", invisible=False)
    assert await online(moderator, ghosts[1]) == [ghosts[1]]  # control
    for r in (moderator, *raws):
        await r.close()

    # switching on one node is heard on the channels the user is in through another node
    ch, ivy_name = f"public:{name('hall')}", name("ivy")
    watcher = await Raw.open(b.url, token(name("watcher")))
    await watcher.ok("subscribe", channel=ch)
    ivy_on_a = await Raw.open(a.url, token(ivy_name))
    await ivy_on_a.ok("subscribe", channel=ch)
    assert await presence_push(watcher) == ("join", ivy_name)
    ivy_on_b = await Raw.open(b.url, token(ivy_name))  # her other device, not in the channel
    await ivy_on_b.ok("presence.invisible", invisible=True)
    assert await presence_push(watcher) == ("leave", ivy_name)
    await ivy_on_b.ok("presence.invisible", invisible=False)
    assert await presence_push(watcher) == ("join", ivy_name)
    for r in (watcher, ivy_on_a, ivy_on_b):
        await r.close()


async def test_an_invisible_room_member_is_neither_listed_nor_counted(
    node_factory: Any,
) -> None:
    node: Node = node_factory("n")
    room, ghost_name, mate_name = f"room:{name('r')}", name("ghost"), name("mate")
    for user in (ghost_name, mate_name):
        await asyncio.to_thread(node.add_member, room, user)
    ghost = await Raw.open(node.url, token(ghost_name))
    mate = await Raw.open(node.url, token(mate_name))
    await mate.ok("subscribe", channel=room)
    await ghost.ok("subscribe", channel=room)
    assert await presence_push(mate) == ("join", ghost_name)  # control: visible so far
    reply = await mate.ok("presence", channel=room)
    assert reply["total"] == 2

    await ghost.ok("presence.invisible", invisible=True)
    assert await presence_push(mate) == ("leave", ghost_name)  # seen to go
    reply = await mate.ok("presence", channel=room)
    assert [m["user"] for m in reply["members"]] == [mate_name] and reply["total"] == 1
    assert await online(mate, ghost_name) == []  # a room mate may ask, and sees "offline"
    await ghost.ok("presence.invisible", invisible=True)  # again: nothing more to tell
    await ghost.ok("presence.invisible", invisible=False)
    assert await presence_push(mate) == ("join", ghost_name)
    assert await online(mate, ghost_name) == [ghost_name]
    for r in (ghost, mate):
        await r.close()


def test_the_visibility_setting_is_related_or_everyone(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    assert config.load(env).presence_visibility == "related"
    everyone = config.load({**env, "RT_PRESENCE_VISIBILITY": "Everyone"})
    assert everyone.presence_visibility == "everyone"
    with pytest.raises(config.ConfigError, match="RT_PRESENCE_VISIBILITY"):
        config.load({**env, "RT_PRESENCE_VISIBILITY": "friends"})
