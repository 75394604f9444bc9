"""The signed membership log on the server (E2EE v2, docs/e2ee/server.md, "Membership log";
the log itself: docs/e2ee/membership.md): `members.log.append` and `members.log.fetch`.

The server checks every entry as members will (`crypto.membership.MembershipState.apply`, with
the actor device's key from the directory) before it stores it, because one invalid entry
would stop every honest client at that epoch. Entries are stored one per epoch with an insert
that fails when the key exists, so of two entries racing for one epoch exactly one is kept
(on any number of nodes sharing the store). An accepted entry is mirrored into the server's
memberships through the same path as the HTTP room-member API (`add` makes a member;
`remove` and `leave` remove one, with the usual `unsubscribed` and `rekey` pushes) and
announced on the channel as `{"push": "members.log", channel, epoch}`.

Records (`store.records`, coll `mlog`): key `<channel>|<%010d epoch>`, doc `{entry}` (the
entry's wire map), index `epoch`. Each node keeps the verified state of recently used logs
and reads only the entries appended since.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from realtime_safety.channels.acl import AccessControl, Action
from realtime_safety.channels.hub import Hub
from realtime_safety.channels.ops import channel_of
from realtime_safety.channels.service import ChannelService
from realtime_safety.protocol import Codec, Feature, ProtocolError, Reply, Session, arg_int
from realtime_safety.storage import DocStore, Store

from .directory_v2 import certified_device
from .membership import WIRE_FIELDS, MemberEntry, MembershipError
from .membership_state import MembershipState
from .todevice import Publish, ToDeviceOps, publish_quietly

log = logging.getLogger("realtime.member_log")

COLL: Final = "mlog"
MAX_FETCH: Final = 1000  # entries per members.log.fetch (page on with `after`)
CACHE_SIZE: Final = 1000  # verified states kept per node
CONFLICT_KINDS: Final = frozenset({"epoch", "prev_hash", "fork"})
BAD_KINDS: Final = frozenset({"malformed", "channel"})
BYTE_FIELDS: Final = ("prev", "sig")

# (channel, user, added) -> the server membership changed as the HTTP room-member API does it
Mirror = Callable[[str, str, bool], Awaitable[None]]


def entry_arg(value: object, codec: Codec) -> MemberEntry:
    """The `entry` argument (byte fields as the codec carries them) as a MemberEntry."""
    if not isinstance(value, dict) or set(value) != set(WIRE_FIELDS):
        raise ProtocolError("bad_request", f"'entry' must be a map of {', '.join(WIRE_FIELDS)}")
    wire = dict(value)
    for name in BYTE_FIELDS:
        wire[name] = codec.bytes_field(value[name])
    try:
        return MemberEntry.from_wire(wire)
    except MembershipError as err:
        raise ProtocolError("bad_request", f"entry: {err}") from None


def refusal(err: MembershipError) -> ProtocolError:
    if err.kind in CONFLICT_KINDS:
        return ProtocolError("conflict", f"{err} (fetch the log and retry)")
    if err.kind in BAD_KINDS:
        return ProtocolError("bad_request", str(err))
    return ProtocolError("forbidden", str(err))


class MemberLogOps(Feature):
    def __init__(
        self, records: DocStore, acl: AccessControl, mirror: Mirror, publish: Publish
    ) -> None:
        self._records = records
        self._acl = acl
        self._mirror = mirror
        self._publish = publish
        self._states: OrderedDict[str, MembershipState] = OrderedDict()
        self.ops = {"members.log.append": self.append, "members.log.fetch": self.fetch}

    async def _state(self, session: Session, channel: str) -> MembershipState:
        """The channel's verified log as stored now (the cached state, caught up)."""
        state = self._states.get(channel)
        state = state.copy() if state is not None else MembershipState(channel)
        keys: dict[tuple[str, str], bytes | None] = {}
        while True:
            doc = await session.bounded(
                self._records.get(COLL, f"{channel}|{state.epoch + 1:010d}")
            )
            if doc is None:
                break
            entry = MemberEntry.from_wire(doc["entry"])
            ref = (entry.actor_user, entry.actor_device)
            if ref not in keys:  # accepted once: the device's key, revoked since or not
                found = await session.bounded(self._records.get("dir.device", "|".join(ref)))
                keys[ref] = found["ed25519"] if found else None
            state.apply(entry, lambda u, d: keys.get((u, d)))
        self._remember(state)
        return state

    def _remember(self, state: MembershipState) -> None:
        held = self._states.get(state.channel)
        if held is None or held.epoch < state.epoch:
            self._states[state.channel] = state.copy()
        self._states.move_to_end(state.channel)
        while len(self._states) > CACHE_SIZE:
            self._states.popitem(last=False)

    async def append(self, session: Session, frame: dict[str, Any]) -> Reply:
        ch = channel_of(frame)
        if ch.namespace != "room":
            raise ProtocolError("bad_request", "only room: channels have a membership log")
        entry = entry_arg(frame.get("entry"), session.codec)
        who = session.identity
        if entry.channel != ch.name:
            raise ProtocolError("bad_request", f"the entry is for {entry.channel!r}")
        if entry.actor_user != who.user:
            raise ProtocolError("forbidden", "the entry's actor must be the caller")
        if await self._acl.banned(who.user, ch.name):
            raise ProtocolError("forbidden", f"banned from {ch.name}")
        device = await session.bounded(
            certified_device(self._records, who.user, entry.actor_device)
        )
        if device is None:
            raise ProtocolError(
                "forbidden", f"you have no certified, unrevoked device {entry.actor_device!r}"
            )
        if entry.op == "create":
            await self._acl.check(who, ch, Action.PUBLISH)  # a member as the server knows it
        state = await self._state(session, ch.name)
        key = device.ed25519
        try:
            new = state.apply(
                entry, lambda u, d: key if (u, d) == (who.user, device.device) else None
            )
        except MembershipError as err:
            raise refusal(err) from None
        if not new:  # the same entry again (a retry): finish what it started if it is the head
            if entry.epoch == state.epoch:
                await self._announce(entry)
            return {"epoch": entry.epoch, "head": entry.hash()}
        held = await session.bounded(
            self._records.insert(
                COLL, f"{ch.name}|{entry.epoch:010d}", {"entry": entry.to_wire()}, ix=entry.epoch
            )
        )
        if held is not None:
            self._states.pop(ch.name, None)
            if held["entry"] != entry.to_wire():
                raise ProtocolError(
                    "conflict", f"another entry took epoch {entry.epoch} (fetch the log and retry)"
                )
        else:
            self._remember(state)
        await self._announce(entry)
        return {"epoch": entry.epoch, "head": entry.hash()}

    async def _announce(self, entry: MemberEntry) -> None:
        """Mirror the entry into the server's memberships and push it to the channel: the log
        push first for a removal (members learn why before the `rekey`), after for an add."""
        push = {"push": "members.log", "channel": entry.channel, "epoch": entry.epoch}
        if entry.op in ("remove", "leave"):
            await publish_quietly(self._publish, entry.channel, push)
            await self._mirror(entry.channel, entry.target_user, False)
            return
        if entry.op == "add":
            await self._mirror(entry.channel, entry.target_user, True)
        await publish_quietly(self._publish, entry.channel, push)

    async def fetch(self, session: Session, frame: dict[str, Any]) -> Reply:
        ch = channel_of(frame)
        if ch.namespace != "room":
            raise ProtocolError("bad_request", "only room: channels have a membership log")
        after = arg_int(frame, "after") or 0
        await self._acl.check(session.identity, ch, Action.HISTORY)
        state = await self._state(session, ch.name)
        entries = state.entries[after : after + MAX_FETCH]
        return {"entries": [e.to_wire() for e in entries], "epoch": state.epoch}


class NodeParts(Protocol):
    """What the ops need of the server node (`realtime.node.Node`)."""

    @property
    def store(self) -> Store: ...

    @property
    def acl(self) -> AccessControl: ...

    @property
    def channels(self) -> ChannelService: ...

    @property
    def hub(self) -> Hub: ...

    async def membership_changed(self, channel: str, user: str, added: bool) -> None: ...


def e2ee_v2_features(node: NodeParts) -> list[Feature]:
    """The to-device and membership-log ops, wired to the node: membership changes go through
    the HTTP room-member API's path (`channels` then `membership_changed`), pushes through the
    hub as the alert service's do (a `raw` event: the push as is, to the channel's
    subscribers on every node)."""

    async def mirror(channel: str, user: str, added: bool) -> None:
        if added:
            await node.channels.add_member(channel, user)
        else:
            await node.channels.remove_member(channel, user)
        await node.membership_changed(channel, user, added=added)

    async def publish(channel: str, push: dict[str, Any]) -> None:
        await node.hub.publish_event(channel, "raw", p=push)

    records = node.store.records
    return [ToDeviceOps(records, publish), MemberLogOps(records, node.acl, mirror, publish)]
