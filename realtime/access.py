"""Access that ends when it should (issue 23): what a session keeps after a `refresh`, what a
globally banned user may still do, and what a contact removed mid-alert loses."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from realtime_safety.protocol import Identity, ProtocolError, Session

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("realtime.access")

# What a globally banned user may still do (a ban limits chat, not safety): the alert ops an
# owner has, under a "user"-only identity, so a banned moderator or responder acts as the owner.
SAFETY_OPS = frozenset(
    {
        "auth",
        "refresh",
        "ping",
        "alert.trigger",
        "alert.location",
        "alert.resolve",
        "alert.cancel",
        "alert.status",
        "alert.trail",
        "checkin.start",
        "checkin.location",
        "checkin.extend",
        "checkin.done",
    }
)


def safety_only(identity: Identity) -> Identity:
    """The identity a globally banned user's session runs under: the role `user` only."""
    return dataclasses.replace(identity, roles=frozenset({"user"}))


async def reauthorize(
    node: Node, session: Session, identity: Identity
) -> Callable[[], Awaitable[None]]:
    """Check what `session` holds against `identity` (its identity after a `refresh`), with
    the checks the ops themselves use; changes nothing. Returns what ends it, to run once the
    session has the new identity: subscriptions it may no longer make (`unsubscribed`, reason
    `revoked`), for one that is no moderator now, its watch patterns (`mod.unwatched`), and
    for one that is no responder now, its place among the nearby responders."""
    revoked = await node.channel_ops.revoked(session, identity)
    was_responder = "responder" in session.identity.roles

    async def end() -> None:
        node.channel_ops.end(session, revoked, "revoked")
        if not identity.is_moderator:
            await node.moderation.revoke(session, "revoked")
        if was_responder and "responder" not in identity.roles:  # out of the nearby index
            await node.alerts.lane.run(node.alerts.responders.forget(identity.user))

    return end


async def contacts_removed(node: Node, users: list[str]) -> None:
    """An owner took `users` off their emergency contacts (`PUT /v1/users/{user}/contacts`):
    they lose the owner's alerts (`alerts.views.still_alerted`), and on every node (this one
    at once, the others over the broker, as for a ban) their alert subscriptions are checked
    again (`recheck_alerts`)."""
    if users:
        await node.broadcast({"t": "contacts", "u": users})


async def recheck_alerts(node: Node, users: object) -> None:
    """The `alert:` subscriptions of `users`' sessions on this node (None: of every session,
    after a broker outage, when a removal's broadcast may have been missed), checked again with
    the subscribe op's own check (as after a `refresh`): those they may no longer make end at
    once (`unsubscribed`, reason `revoked`)."""
    if users is None:
        sessions = node.every()
    elif isinstance(users, list):
        sessions = [s for user in users if isinstance(user, str) for s in node.of_user(user)]
    else:
        return
    for session in sessions:
        try:
            revoked = await node.channel_ops.revoked(session, session.identity, "alert")
        except ProtocolError as exc:  # the store cannot say now: the next refresh checks again
            log.warning("alert subscriptions not checked again: %s", exc)
            continue
        node.channel_ops.end(session, revoked, "revoked")
