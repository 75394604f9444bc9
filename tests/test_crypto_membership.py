"""Signed room membership (crypto/membership.py, crypto/membership_state.py,
docs/e2ee/membership.md): every rule of the rules table both ways, every way a chain can break,
forks, the client's send/rotate rules, the committed vectors (tests/vectors/membership-v2.json),
and random sequences against a model.

`make()` builds the vectors from the documented steps with msgpack, hashlib and PyNaCl alone
(not the module); the tests check the committed file is what those steps give and that the
module verifies it to the documented member sets. Regenerate (only when the format changes):
`PYTHONPATH=. python tests/test_crypto_membership.py > tests/vectors/membership-v2.json`
(from the repository root, so that `realtime_safety` is this checkout)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from realtime_safety.crypto.e2ee import CryptoError
from realtime_safety.crypto.membership import (
    ZERO_HASH,
    ForkError,
    MemberEntry,
    MembershipError,
    entry_hash,
    entry_statement,
    sign_entry,
)
from realtime_safety.crypto.membership_state import (
    MembershipState,
    check_received,
    check_send,
    diff,
    must_rotate,
    recipients,
    sign_next,
)

FILE = Path(__file__).parent / "vectors" / "membership-v2.json"
ROOM = "room:climbing-club"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms

# Fixed keys: user -> (device id, Ed25519 seed)
PEOPLE = {
    "alice": ("alice-phone", bytes(range(1, 33))),
    "bob": ("bob-laptop", bytes(range(33, 65))),
    "carol": ("carol-tablet", bytes(range(65, 97))),
    "dave": ("dave-phone", bytes(range(97, 129))),
    "erin": ("erin-watch", bytes(range(129, 161))),
}
KEYS = {user: SigningKey(seed) for user, (_, seed) in PEOPLE.items()}
DEVICE = {user: device for user, (device, _) in PEOPLE.items()}


def lookup(user: str, device: str) -> bytes | None:
    """The caller's cross-signing-verified devices: one per person."""
    if user in PEOPLE and DEVICE[user] == device:
        return bytes(KEYS[user].verify_key)
    return None


def nxt(
    state: MembershipState,
    actor: str,
    op: str,
    target: str | None = None,
    role: str = "",
    **override: Any,
) -> MemberEntry:
    """The entry `actor` would sign next on `state` (fields overridable before signing)."""
    fields: dict[str, Any] = {
        "channel": state.channel,
        "epoch": state.epoch + 1,
        "prev_hash": state.head,
        "op": op,
        "target_user": actor if target is None else target,
        "role": role,
        "actor_user": actor,
        "actor_device": DEVICE[actor],
        "ts_ms": T0 + 60_000 * state.epoch,
    }
    signer = override.pop("signer", KEYS[actor])
    fields.update(override)
    return sign_entry(signer, **fields)


def room(*steps: tuple[str, str, str, str]) -> MembershipState:
    """alice creates the room, then each (actor, op, target, role) step is applied."""
    state = MembershipState(ROOM)
    assert state.apply(nxt(state, "alice", "create", role="owner"), lookup)
    for actor, op, target, role in steps:
        assert state.apply(nxt(state, actor, op, target, role), lookup)
    return state


def rejected(state: MembershipState, entry: MemberEntry, kind: str) -> MembershipError:
    """Apply must raise `kind` and leave the state as it was."""
    before = (dict(state.members), state.epoch, state.head, state.rotation_epoch)
    with pytest.raises(MembershipError) as caught:
        state.apply(entry, lookup)
    assert caught.value.kind == kind, caught.value.reason
    assert (dict(state.members), state.epoch, state.head, state.rotation_epoch) == before
    return caught.value


# alice owner, bob admin, carol member
STAFFED = (
    ("alice", "add", "bob", "member"),
    ("alice", "add", "carol", "member"),
    ("alice", "role", "bob", "admin"),
)


# -- the bytes -------------------------------------------------------------------------------


def test_statement_is_the_documented_msgpack_array_and_the_hash_its_sha256() -> None:
    statement = entry_statement(ROOM, 2, b"\x01" * 32, "add", "bob", "member", "alice", "d", 5)
    assert statement == msgpack.packb(
        ["rt.v2.member", ROOM, 2, b"\x01" * 32, "add", "bob", "member", "alice", "d", 5],
        use_bin_type=True,
    )
    assert entry_hash(statement) == hashlib.sha256(statement).digest()


def test_wire_round_trip_and_every_shape_error() -> None:
    entry = nxt(MembershipState(ROOM), "alice", "create", role="owner")
    wire = entry.to_wire()
    assert MemberEntry.from_wire(wire) == entry
    assert MemberEntry.from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False)) == entry
    broken: list[dict[str, Any]] = [
        {k: v for k, v in wire.items() if k != "sig"},
        {**wire, "extra": 1},
        {**wire, "epoch": True},
        {**wire, "epoch": 0},
        {**wire, "epoch": 2**53},
        {**wire, "epoch": "1"},
        {**wire, "ts": -1},
        {**wire, "prev": bytes(31)},
        {**wire, "sig": wire["sig"][:63]},
        {**wire, "sig": wire["sig"].hex()},
        {**wire, "channel": ""},
        {**wire, "user": 7},
        {**wire, "actor_device": ""},
        {**wire, "op": "ban"},
        {**wire, "role": "moderator"},
        {**wire, "role": "member"},  # create makes an owner
        {**wire, "user": "bob"},  # create targets its actor
        {**wire, "op": "add", "role": ""},  # add needs a role
        {**wire, "op": "leave", "user": "bob", "role": ""},  # leave targets its actor
        {**wire, "op": "leave", "role": "member"},  # leave carries no role
        {**wire, "op": "remove", "role": ""},  # remove someone else
        {**wire, "op": "remove", "user": "bob", "role": "member"},
    ]
    for bad in broken:
        with pytest.raises(MembershipError) as caught:
            MemberEntry.from_wire(bad)
        assert caught.value.kind == "malformed", bad
    with pytest.raises(MembershipError):
        MemberEntry.from_wire([1, 2])
    assert isinstance(MembershipError("x", "y"), CryptoError)


def test_apply_checks_the_shape_of_entries_made_in_code_too() -> None:
    state = MembershipState(ROOM)
    entry = nxt(state, "alice", "create", role="owner")
    rejected(state, dataclasses.replace(entry, role="admin"), "malformed")
    rejected(state, dataclasses.replace(entry, prev_hash=b"short"), "malformed")


def test_logs_exist_for_rooms_only() -> None:
    for channel in ("public:lobby", "user:alice", "room:", "alert:1"):
        with pytest.raises(ValueError):
            MembershipState(channel)


# -- the rules table ---------------------------------------------------------------------------


def test_create_makes_its_actor_the_owner_at_epoch_1() -> None:
    state = room()
    assert dict(state.members) == {"alice": "owner"}
    assert state.epoch == 1 and state.rotation_epoch == 0
    assert state.head == state.entries[0].hash() == state.hash_at(1)
    assert state.hash_at(0) == ZERO_HASH


def test_a_log_starts_with_create_and_has_only_one() -> None:
    empty = MembershipState(ROOM)
    # bob "adds" himself as the first entry: no create, no owner
    rejected(empty, nxt(empty, "bob", "add", "bob", "member"), "invalid")
    state = room()
    rejected(state, nxt(state, "alice", "create", role="owner"), "invalid")
    rejected(state, nxt(state, "bob", "create", role="owner"), "invalid")


@pytest.mark.parametrize(
    ("actor", "role"),
    [("alice", "member"), ("alice", "admin"), ("alice", "owner"), ("bob", "member")],
)
def test_who_may_add_positive(actor: str, role: str) -> None:
    state = room(*STAFFED)
    assert state.apply(nxt(state, actor, "add", "dave", role), lookup)
    assert state.members["dave"] == role and state.epoch == 5
    assert state.rotation_epoch == 0


@pytest.mark.parametrize(
    ("actor", "role", "kind"),
    [
        ("carol", "member", "forbidden"),  # a plain member
        ("dave", "member", "forbidden"),  # not a member
        ("erin", "member", "forbidden"),  # not a member adding someone else
        ("bob", "admin", "forbidden"),  # an admin cannot grant admin
        ("bob", "owner", "forbidden"),
    ],
)
def test_who_may_add_negative(actor: str, role: str, kind: str) -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, actor, "add", "dave" if actor != "dave" else "erin", role), kind)


def test_adding_an_existing_member_is_invalid() -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, "alice", "add", "carol", "member"), "invalid")
    rejected(state, nxt(state, "bob", "add", "alice", "member"), "invalid")


@pytest.mark.parametrize(
    ("actor", "target"),
    [("alice", "carol"), ("bob", "carol"), ("alice", "bob"), ("bob", "dave")],
)
def test_who_may_remove_positive(actor: str, target: str) -> None:
    state = room(*STAFFED, ("alice", "add", "dave", "admin"))
    assert state.apply(nxt(state, actor, "remove", target), lookup)
    assert target not in state.members and state.rotation_epoch == state.epoch == 6


def test_an_owner_may_remove_another_owner() -> None:
    state = room(*STAFFED, ("alice", "role", "carol", "owner"))
    assert state.apply(nxt(state, "carol", "remove", "alice"), lookup)
    assert dict(state.members) == {"bob": "admin", "carol": "owner"}


@pytest.mark.parametrize(
    ("actor", "target", "kind"),
    [
        ("bob", "alice", "forbidden"),  # an admin cannot remove an owner
        ("carol", "bob", "forbidden"),  # a member removes nobody
        ("dave", "carol", "forbidden"),  # a non-member removes nobody
        ("alice", "erin", "invalid"),  # removing a non-member
        ("bob", "erin", "invalid"),
        ("carol", "erin", "forbidden"),  # authority is judged first
    ],
)
def test_who_may_remove_negative(actor: str, target: str, kind: str) -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, actor, "remove", target), kind)


@pytest.mark.parametrize(
    ("target", "role"),
    [("carol", "admin"), ("carol", "owner"), ("bob", "member"), ("bob", "owner")],
)
def test_only_owners_change_roles_positive(target: str, role: str) -> None:
    state = room(*STAFFED)
    assert state.apply(nxt(state, "alice", "role", target, role), lookup)
    assert state.members[target] == role and state.rotation_epoch == 0


@pytest.mark.parametrize(
    ("actor", "target", "role", "kind"),
    [
        ("bob", "carol", "admin", "forbidden"),  # an admin cannot grant admin
        ("bob", "bob", "owner", "forbidden"),  # nor make itself owner
        ("bob", "alice", "member", "forbidden"),  # nor demote an owner
        ("carol", "carol", "admin", "forbidden"),
        ("dave", "carol", "admin", "forbidden"),
        ("alice", "carol", "member", "invalid"),  # no change
        ("alice", "dave", "admin", "invalid"),  # not a member
        ("alice", "alice", "admin", "invalid"),  # the last owner
    ],
)
def test_only_owners_change_roles_negative(actor: str, target: str, role: str, kind: str) -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, actor, "role", target, role), kind)


def test_an_owner_may_step_down_or_demote_another_owner_when_one_is_left() -> None:
    state = room(*STAFFED, ("alice", "role", "bob", "owner"))
    assert state.apply(nxt(state, "alice", "role", "alice", "admin"), lookup)
    assert state.members["alice"] == "admin" and state.members["bob"] == "owner"
    rejected(state, nxt(state, "bob", "role", "bob", "member"), "invalid")  # now the last
    assert state.apply(nxt(state, "bob", "role", "alice", "owner"), lookup)
    assert state.apply(nxt(state, "alice", "role", "bob", "member"), lookup)
    assert dict(state.members) == {"alice": "owner", "bob": "member", "carol": "member"}


@pytest.mark.parametrize("who", ["bob", "carol"])
def test_anyone_may_leave(who: str) -> None:
    state = room(*STAFFED)
    assert state.apply(nxt(state, who, "leave"), lookup)
    assert who not in state.members and state.rotation_epoch == 5


def test_the_last_owner_cannot_leave_but_one_of_two_can() -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, "alice", "leave"), "invalid")
    alone = room()
    rejected(alone, nxt(alone, "alice", "leave"), "invalid")
    state.apply(nxt(state, "alice", "role", "carol", "owner"), lookup)
    assert state.apply(nxt(state, "alice", "leave"), lookup)
    assert dict(state.members) == {"bob": "admin", "carol": "owner"}


def test_a_non_member_cannot_leave() -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, "dave", "leave"), "forbidden")


def test_a_removed_member_has_no_authority_left() -> None:
    state = room(*STAFFED, ("alice", "remove", "bob", ""))
    rejected(state, nxt(state, "bob", "add", "dave", "member"), "forbidden")
    rejected(state, nxt(state, "bob", "remove", "carol"), "forbidden")
    rejected(state, nxt(state, "bob", "leave"), "forbidden")


def test_a_member_added_again_starts_with_the_role_given_then() -> None:
    state = room(*STAFFED, ("alice", "remove", "bob", ""), ("alice", "add", "bob", "member"))
    assert state.members["bob"] == "member"
    rejected(state, nxt(state, "bob", "remove", "carol"), "forbidden")


def test_sign_next_links_signs_and_refuses_what_members_would_refuse() -> None:
    state = room(*STAFFED)
    entry = sign_next(state, KEYS["bob"], op="add", target_user="dave", role="member",
                      actor_user="bob", actor_device=DEVICE["bob"], ts_ms=T0)  # fmt: skip
    assert (entry.epoch, entry.prev_hash) == (5, state.head) and state.epoch == 4
    assert entry == nxt(state, "bob", "add", "dave", "member", ts_ms=T0)
    with pytest.raises(MembershipError) as caught:
        sign_next(state, KEYS["bob"], op="remove", target_user="alice", role="",
                  actor_user="bob", actor_device=DEVICE["bob"], ts_ms=T0)  # fmt: skip
    assert caught.value.kind == "forbidden" and state.epoch == 4
    assert state.apply(entry, lookup) and "dave" in state.members


def test_members_is_a_snapshot() -> None:
    state = room()
    before = state.members
    state.apply(nxt(state, "alice", "add", "bob", "member"), lookup)
    assert dict(before) == {"alice": "owner"} and "bob" in state.members


# -- chain breaks ------------------------------------------------------------------------------


def test_a_wrong_prev_hash_is_refused() -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, "alice", "add", "dave", "member", prev_hash=bytes(32)), "prev_hash")
    stale = state.hash_at(2)
    rejected(state, nxt(state, "alice", "add", "dave", "member", prev_hash=stale), "prev_hash")
    first = MembershipState(ROOM)
    bad_create = nxt(first, "alice", "create", role="owner", prev_hash=b"\x01" * 32)
    rejected(first, bad_create, "prev_hash")


def test_a_skipped_epoch_is_refused() -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, "alice", "add", "dave", "member", epoch=6), "epoch")
    first = MembershipState(ROOM)
    rejected(first, nxt(first, "alice", "create", role="owner", epoch=2), "epoch")


def test_an_entry_of_another_room_is_refused() -> None:
    state = room(*STAFFED)
    rejected(state, nxt(state, "alice", "add", "dave", "member", channel="room:other"), "channel")


def test_a_bad_signature_is_refused() -> None:
    state = room(*STAFFED)
    entry = nxt(state, "alice", "add", "dave", "member")
    flipped = bytes([entry.sig[0] ^ 1]) + entry.sig[1:]
    rejected(state, dataclasses.replace(entry, sig=flipped), "signature")
    for changed in (
        dataclasses.replace(entry, target_user="erin"),
        dataclasses.replace(entry, role="admin"),
        dataclasses.replace(entry, ts_ms=entry.ts_ms + 1),
    ):
        rejected(state, changed, "signature")
    # signed by bob's key, claiming alice's device
    rejected(state, nxt(state, "alice", "add", "dave", "member", signer=KEYS["bob"]), "signature")
    assert state.apply(entry, lookup)


def test_an_unknown_device_is_refused() -> None:
    state = room(*STAFFED)
    phantom = nxt(state, "alice", "add", "dave", "member", actor_device="alice-new-phone")
    rejected(state, phantom, "unknown_device")
    # bob's real device id, claimed for alice: devices are per user
    rejected(state, nxt(state, "alice", "add", "dave", "member", actor_device="bob-laptop"),
             "unknown_device")  # fmt: skip
    # the server's favourite: a user nobody verified
    mallory = nxt(state, "bob", "add", "dave", "member", actor_user="mallory", signer=KEYS["dave"])
    rejected(state, mallory, "unknown_device")


def test_a_key_that_is_not_an_ed25519_key_is_a_signature_failure() -> None:
    state = room(*STAFFED)
    entry = nxt(state, "alice", "add", "dave", "member")
    with pytest.raises(MembershipError) as caught:
        state.apply(entry, lambda user, device: b"short")
    assert caught.value.kind == "signature"


def test_from_log_verifies_the_whole_chain() -> None:
    state = room(*STAFFED, ("bob", "remove", "carol", ""))
    again = MembershipState.from_log(ROOM, state.entries, lookup)
    assert dict(again.members) == dict(state.members) and again.head == state.head
    entries = list(state.entries)
    with pytest.raises(MembershipError) as caught:
        MembershipState.from_log(ROOM, entries[:2] + entries[3:], lookup)
    assert caught.value.kind == "epoch"
    with pytest.raises(MembershipError) as caught:
        MembershipState.from_log("room:other", entries, lookup)
    assert caught.value.kind == "channel"
    with pytest.raises(MembershipError) as caught:  # a device nobody verified any more
        MembershipState.from_log(ROOM, entries, lambda u, d: None if u == "bob" else lookup(u, d))
    assert caught.value.kind == "unknown_device"


def test_a_repeated_entry_changes_nothing() -> None:
    state = room(*STAFFED)
    head = state.head
    for entry in state.entries:
        assert state.apply(entry, lookup) is False
    assert state.head == head and state.epoch == 4
    log = list(state.entries)
    assert MembershipState.from_log(ROOM, log[:2] + log[1:], lookup).head == head


# -- forks -------------------------------------------------------------------------------------


def test_a_different_valid_entry_for_a_held_epoch_is_fork_evidence() -> None:
    base = room(("alice", "add", "bob", "member"))
    shown_to_alice = base.copy()
    shown_to_bob = base.copy()
    ours = nxt(shown_to_alice, "alice", "add", "carol", "member")
    theirs = nxt(shown_to_bob, "alice", "add", "dave", "member")
    assert shown_to_alice.apply(ours, lookup) and shown_to_bob.apply(theirs, lookup)
    with pytest.raises(ForkError) as caught:
        shown_to_alice.apply(theirs, lookup)
    fork = caught.value
    assert fork.kind == "fork" and fork.epoch == 3
    assert fork.ours == ours and fork.theirs == theirs and fork.theirs_hash == theirs.hash()
    assert shown_to_alice.epoch == 3 and "dave" not in shown_to_alice.members
    with pytest.raises(ForkError):
        MembershipState.from_log(ROOM, [*base.entries, ours, theirs], lookup)


def test_two_creates_of_one_room_are_a_fork() -> None:
    state = room()
    other = nxt(MembershipState(ROOM), "bob", "create", role="owner")
    with pytest.raises(ForkError) as caught:
        state.apply(other, lookup)
    assert caught.value.epoch == 1


def test_an_older_entry_that_would_not_have_been_valid_is_no_fork() -> None:
    state = room(*STAFFED)  # epoch 4: bob became admin at epoch 4
    at_2 = MembershipState.from_log(ROOM, state.entries[:2], lookup)
    # bob, a plain member at epoch 2, "adds" dave as epoch 3: no authority, so no evidence
    rejected(state, nxt(at_2, "bob", "add", "dave", "member"), "forbidden")
    rejected(state, nxt(at_2, "alice", "add", "dave", "member", signer=KEYS["dave"]), "signature")
    rejected(state, nxt(at_2, "alice", "add", "dave", "member", actor_device="x"), "unknown_device")
    rejected(state, nxt(at_2, "alice", "add", "dave", "member", prev_hash=bytes(32)), "prev_hash")
    rejected(state, nxt(at_2, "alice", "add", "dave", "member", channel="room:x"), "channel")


def test_check_head_compares_gossiped_heads() -> None:
    state = room(*STAFFED)
    assert state.check_head(4, state.head) and state.check_head(2, state.hash_at(2))
    assert state.check_head(0, ZERO_HASH)
    assert state.check_head(5, b"\x07" * 32) is False  # ahead of us: fetch and apply
    with pytest.raises(ForkError) as caught:
        state.check_head(3, b"\x07" * 32)
    assert caught.value.epoch == 3 and caught.value.theirs is None
    assert caught.value.ours == state.entries[2]
    for epoch, head in [(0, b"\x07" * 32), (-1, state.head), (4, b"short")]:
        with pytest.raises(MembershipError) as err:
            state.check_head(epoch, head)
        assert err.value.kind == "malformed"


# -- what the client does with it -------------------------------------------------------------


def test_recipients_come_from_the_log() -> None:
    state = room(*STAFFED, ("bob", "remove", "carol", ""))
    assert recipients(state) == {"alice", "bob"}
    assert recipients(MembershipState(ROOM)) == set()


def test_must_rotate_on_removal_and_leave_only() -> None:
    state = room(*STAFFED)
    for step, rotates in [
        (("alice", "add", "dave", "member"), False),
        (("alice", "role", "dave", "admin"), False),
        (("dave", "remove", "carol", ""), True),
        (("alice", "add", "carol", "member"), False),
        (("bob", "leave", "bob", ""), True),
    ]:
        old = state.copy()
        assert state.apply(nxt(state, *step), lookup)
        assert must_rotate(old, state) is rotates, step
        assert must_rotate(state, state) is False
    # removed and added again since: still rotate (she was out in between)
    first = room(*STAFFED)
    later = first.copy()
    later.apply(nxt(later, "alice", "remove", "carol"), lookup)
    later.apply(nxt(later, "alice", "add", "carol", "member"), lookup)
    assert set(first.members) == set(later.members) and must_rotate(first, later)
    with pytest.raises(ValueError):
        must_rotate(first, MembershipState("room:other"))


def test_check_send_refuses_sessions_older_than_the_last_removal() -> None:
    state = room(*STAFFED)  # epoch 4
    check_send(1, state)  # adds and role changes since: fine
    state.apply(nxt(state, "bob", "remove", "carol"), lookup)  # epoch 5
    for old in (1, 4):
        with pytest.raises(MembershipError) as caught:
            check_send(old, state)
        assert caught.value.kind == "stale_session"
    check_send(5, state)
    state.apply(nxt(state, "alice", "add", "dave", "member"), lookup)  # epoch 6
    check_send(5, state)
    check_send(6, state)
    with pytest.raises(MembershipError) as caught:  # a session from a log we no longer see
        check_send(7, state)
    assert caught.value.kind == "stale_session"


def test_check_received_wants_a_member_and_a_stamp_we_have_reached() -> None:
    state = room(*STAFFED, ("bob", "remove", "carol", ""))  # epoch 5
    check_received(5, "bob", state)
    check_received(1, "alice", state)
    for epoch, sender, kind in [(6, "bob", "behind"), (4, "carol", "not_member"),
                                (5, "mallory", "not_member"), (6, "carol", "behind")]:  # fmt: skip
        with pytest.raises(MembershipError) as caught:
            check_received(epoch, sender, state)
        assert caught.value.kind == kind


def test_diff_says_what_the_server_lists_that_the_log_does_not() -> None:
    state = room(*STAFFED)
    assert diff(state, ["alice", "bob", "carol"]) == (set(), set())
    assert diff(state, ["alice", "bob", "carol", "mallory"]) == ({"mallory"}, set())
    assert diff(state, iter(["alice", "mallory"])) == ({"mallory"}, {"bob", "carol"})


def test_members_cannot_be_changed_through_the_property() -> None:
    state = room()
    with pytest.raises(TypeError):
        state.members["mallory"] = "owner"  # type: ignore[index]


# -- the committed vectors ---------------------------------------------------------------------

LOG = [  # (actor, op, target, role) and the members after it
    ("alice", "create", "alice", "owner"),
    ("alice", "add", "bob", "member"),
    ("alice", "add", "carol", "member"),
    ("alice", "role", "bob", "admin"),
    ("bob", "remove", "carol", ""),
    ("bob", "leave", "bob", ""),
]
MEMBERS_AFTER = [
    {"alice": "owner"},
    {"alice": "owner", "bob": "member"},
    {"alice": "owner", "bob": "member", "carol": "member"},
    {"alice": "owner", "bob": "admin", "carol": "member"},
    {"alice": "owner", "bob": "admin"},
    {"alice": "owner"},
]
ROTATION_AFTER = [0, 0, 0, 0, 5, 6]
# Entries a verifier must refuse: (name, against the state after epoch N, fields, kind)
REJECTIONS: list[tuple[str, int, dict[str, Any], str]] = [
    ("admin removes the owner", 4,
     {"actor": "bob", "op": "remove", "user": "alice", "role": ""}, "forbidden"),
    ("member adds", 3,
     {"actor": "carol", "op": "add", "user": "dave", "role": "member"}, "forbidden"),
    ("last owner leaves", 6,
     {"actor": "alice", "op": "leave", "user": "alice", "role": ""}, "invalid"),
    ("wrong prev_hash", 2,
     {"actor": "alice", "op": "add", "user": "carol", "role": "member", "prev": "00" * 32},
     "prev_hash"),
    ("skipped epoch", 2,
     {"actor": "alice", "op": "add", "user": "carol", "role": "member", "epoch": 4}, "epoch"),
    ("signed by another key", 2,
     {"actor": "alice", "op": "add", "user": "carol", "role": "member", "signer": "dave"},
     "signature"),
    ("fork: another add at epoch 3", 3,
     {"actor": "alice", "op": "add", "user": "dave", "role": "member", "epoch": 3,
      "prev_epoch": 2}, "fork"),
]  # fmt: skip


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def make() -> dict[str, Any]:
    """The vectors from the documented steps (docs/e2ee/membership.md), without the module."""
    keys = {user: SigningKey(seed) for user, (_, seed) in PEOPLE.items()}
    people = {
        user: {
            "device": device,
            "seed": seed.hex(),
            "public_key": bytes(keys[user].verify_key).hex(),
        }
        for user, (device, seed) in PEOPLE.items()
    }

    def one(
        epoch: int, prev: bytes, actor: str, op: str, user: str, role: str, signer: str
    ) -> dict[str, Any]:
        ts = T0 + 60_000 * (epoch - 1)
        fields = [ROOM, epoch, prev, op, user, role, actor, PEOPLE[actor][0], ts]
        statement = pack(["rt.v2.member", *fields])
        return {
            "channel": ROOM, "epoch": epoch, "prev": prev.hex(), "op": op, "user": user,
            "role": role, "actor": actor, "actor_device": PEOPLE[actor][0], "ts": ts,
            "statement": statement.hex(),
            "hash": hashlib.sha256(statement).hexdigest(),
            "sig": keys[signer].sign(statement).signature.hex(),
        }  # fmt: skip

    log, heads = [], [bytes(32)]
    for n, ((actor, op, user, role), members, rotation) in enumerate(
        zip(LOG, MEMBERS_AFTER, ROTATION_AFTER, strict=True), start=1
    ):
        entry = one(n, heads[-1], actor, op, user, role, actor)
        entry["members_after"] = members
        entry["rotation_epoch_after"] = rotation
        log.append(entry)
        heads.append(bytes.fromhex(entry["hash"]))
    rejections = []
    for name, after, f, kind in REJECTIONS:
        epoch = f.get("epoch", after + 1)
        prev = bytes.fromhex(f["prev"]) if "prev" in f else heads[f.get("prev_epoch", after)]
        entry = one(epoch, prev, f["actor"], f["op"], f["user"], f["role"],
                    f.get("signer", f["actor"]))  # fmt: skip
        rejections.append({"name": name, "against_epoch": after, "entry": entry, "kind": kind})
    return {
        "channel": ROOM,
        "people": people,
        "zero_hash": bytes(32).hex(),
        "log": log,
        "rejections": rejections,
    }


def committed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FILE.read_text())
    return data


def wire(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "channel": v["channel"], "epoch": v["epoch"], "prev": bytes.fromhex(v["prev"]),
        "op": v["op"], "user": v["user"], "role": v["role"], "actor": v["actor"],
        "actor_device": v["actor_device"], "ts": v["ts"], "sig": bytes.fromhex(v["sig"]),
    }  # fmt: skip


def vector_lookup(v: dict[str, Any]) -> Callable[[str, str], bytes | None]:
    def find(user: str, device: str) -> bytes | None:
        person = v["people"].get(user)
        if person is None or person["device"] != device:
            return None
        return bytes.fromhex(person["public_key"])

    return find


def test_the_committed_vectors_are_what_the_documented_steps_give() -> None:
    assert committed() == make()


def test_the_module_verifies_the_vector_log_to_the_documented_members() -> None:
    v = committed()
    find = vector_lookup(v)
    state = MembershipState(v["channel"])
    for item in v["log"]:
        entry = MemberEntry.from_wire(wire(item))
        assert entry.statement() == bytes.fromhex(item["statement"])
        assert entry.hash().hex() == item["hash"] and entry.prev_hash == state.head
        assert state.apply(entry, find)
        assert dict(state.members) == item["members_after"]
        assert state.rotation_epoch == item["rotation_epoch_after"]
        assert entry.to_wire() == wire(item)
    # the module signs the same bytes (Ed25519 signatures are deterministic)
    first = v["log"][0]
    mine = sign_entry(
        SigningKey(bytes.fromhex(v["people"]["alice"]["seed"])),
        channel=first["channel"], epoch=1, prev_hash=ZERO_HASH, op="create",
        target_user="alice", role="owner", actor_user="alice",
        actor_device=first["actor_device"], ts_ms=first["ts"],
    )  # fmt: skip
    assert mine.sig.hex() == first["sig"]


def test_the_module_refuses_the_vector_rejections_with_the_documented_kind() -> None:
    v = committed()
    find = vector_lookup(v)
    entries = [MemberEntry.from_wire(wire(item)) for item in v["log"]]
    for case in v["rejections"]:
        state = MembershipState.from_log(v["channel"], entries[: case["against_epoch"]], find)
        with pytest.raises(MembershipError) as caught:
            state.apply(MemberEntry.from_wire(wire(case["entry"])), find)
        assert caught.value.kind == case["kind"], case["name"]


# -- random sequences against a model of the rules table --------------------------------------

USERS = ("alice", "bob", "carol", "dave")
STEP = st.tuples(
    st.sampled_from(USERS),
    st.sampled_from(("add", "remove", "role", "leave")),
    st.sampled_from(USERS),
    st.sampled_from(("owner", "admin", "member")),
)


def model(members: dict[str, str], actor: str, op: str, target: str, role: str) -> str | None:
    """The rules table, written out plainly: the error kind, or None when the op is allowed."""
    mine, theirs = members.get(actor), members.get(target)
    owners = [u for u, r in members.items() if r == "owner"]
    last_owner = owners == [target]
    if mine is None:
        return "forbidden"
    table: dict[str, str | None] = {
        "add": "forbidden" if mine == "member" or (role != "member" and mine != "owner")
        else "invalid" if theirs is not None else None,
        "remove": "forbidden" if mine == "member"
        else "invalid" if theirs is None
        else "forbidden" if theirs == "owner" and mine != "owner" else None,
        "role": "forbidden" if mine != "owner"
        else "invalid" if theirs is None or theirs == role
        or (role != "owner" and last_owner) else None,
        "leave": "invalid" if last_owner else None,
    }  # fmt: skip
    return table[op]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, max_size=14))
def test_random_sequences_follow_the_rules_table(steps: list[tuple[str, str, str, str]]) -> None:
    state = room()
    members = {"alice": "owner"}
    for actor, op, target, role in steps:
        if op == "leave":
            target = actor
        if op in ("leave", "remove"):
            role = ""
        if op == "remove" and target == actor:
            continue  # a shape error, tested above
        expected = model(members, actor, op, target, role)
        entry = nxt(state, actor, op, target, role)
        if expected is None:
            assert state.apply(entry, lookup)
            if op in ("add", "role"):
                members[target] = role
            else:
                del members[target]
        else:
            rejected(state, entry, expected)
        assert dict(state.members) == members
    assert dict(MembershipState.from_log(ROOM, state.entries, lookup).members) == members


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    steps=st.lists(STEP, min_size=1, max_size=8),
)
def test_any_change_to_any_signed_entry_breaks_the_log(
    data: st.DataObject, steps: list[tuple[str, str, str, str]]
) -> None:
    state = room()
    for actor, op, target, role in steps:
        try:
            state.apply(nxt(state, actor, op, target, role), lookup)
        except MembershipError:
            continue  # the model test covers which; here only the accepted ones matter
    entries = list(state.entries)
    at = data.draw(st.integers(0, len(entries) - 1))
    wire_form = entries[at].to_wire()
    field = data.draw(st.sampled_from(sorted(wire_form)))
    value = wire_form[field]
    if isinstance(value, bytes):
        i = data.draw(st.integers(0, len(value) - 1))
        changed: Any = value[:i] + bytes([value[i] ^ 1]) + value[i + 1 :]
    elif isinstance(value, int):
        changed = value + 1
    else:
        changed = value + "x"
    try:
        entries[at] = MemberEntry.from_wire({**wire_form, field: changed})
    except MembershipError:
        return  # the shape alone gave it away
    with pytest.raises(MembershipError):
        MembershipState.from_log(ROOM, entries, lookup)


if __name__ == "__main__":
    json.dump(make(), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
