"""Membership the server cannot forge (E2EE v2, docs/e2ee/membership.md): the verified log.

Clients compute who is in a room, with which role, and at which *epoch* (the log's length) from
the verified chain of entries (`crypto/membership.py`) alone; the server's `members` reply is
only compared against it (`diff`), never believed.

- `MembershipState`: a verified log; `apply` checks one entry (channel, epoch, link, device
  key, signature, the actor's authority, the op's validity) and appends it; `from_log` checks a
  whole chain; two different valid entries for one epoch are a `ForkError` with both as
  evidence; `check_head` compares a head heard elsewhere (gossip) with ours.
- `sign_next`: the next entry on a state, checked as members will check it.
- Client rules: `recipients` (the users whose devices get key shares), `must_rotate`
  (a removal or leave happened), `check_send` (refuse a session older than the last removal),
  `check_received` (a share or message stamped ahead of our log, or from a non-member),
  `diff` (what the server lists that the log does not, and the reverse).

Nothing here trusts the server for device keys: `apply` takes a `device_key(user, device)`
callback, which the caller answers from devices it verified through cross-signing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import nacl.exceptions
from nacl.signing import VerifyKey

from .membership import (
    HASH_BYTES,
    MANAGERS,
    ZERO_HASH,
    ForkError,
    MemberEntry,
    MembershipError,
    Signer,
    _bytes,
    _int,
    check_shape,
    entry_hash,
    public_key,
    sign_entry,
)

DeviceKeyLookup = Callable[[str, str], bytes | None]
"""(user, device) -> that device's Ed25519 public key (32 bytes) if the caller verified it
through cross-signing, else None. Never answered from an unverified server reply."""


def sign_next(
    state: MembershipState,
    signing_key: Signer,
    *,
    op: str,
    target_user: str,
    role: str,
    actor_user: str,
    actor_device: str,
    ts_ms: int,
) -> MemberEntry:
    """The next entry on `state` (epoch + 1, linked to its head), signed, and checked against
    the rules as members will check it: raises the `MembershipError` they would (the state is
    not changed; apply the entry once the server has taken it)."""
    entry = sign_entry(
        signing_key,
        channel=state.channel,
        epoch=state.epoch + 1,
        prev_hash=state.head,
        op=op,
        target_user=target_user,
        role=role,
        actor_user=actor_user,
        actor_device=actor_device,
        ts_ms=ts_ms,
    )
    own = public_key(signing_key)
    state.copy().apply(entry, lambda u, d: own if (u, d) == (actor_user, actor_device) else None)
    return entry


class MembershipState:
    """A room's membership as its verified log says: who (user -> role), at which epoch,
    with which head hash. Starts empty (epoch 0, head = 32 zero bytes); `apply` appends
    one verified entry at a time and leaves the state unchanged when it raises."""

    def __init__(self, channel: str) -> None:
        if not channel.startswith("room:") or len(channel) <= len("room:"):
            raise ValueError("membership logs exist for room: channels only")
        self.channel = channel
        self._members: dict[str, str] = {}
        self._entries: list[MemberEntry] = []
        self._hashes: list[bytes] = []  # _hashes[e - 1] = hash of the entry at epoch e
        self._rotation_epoch = 0

    @classmethod
    def from_log(
        cls, channel: str, entries: Iterable[MemberEntry], device_key: DeviceKeyLookup
    ) -> MembershipState:
        """Verify a whole log from its "create" entry on; any break raises."""
        state = cls(channel)
        for entry in entries:
            state.apply(entry, device_key)
        return state

    def copy(self) -> MembershipState:
        twin = MembershipState(self.channel)
        twin._members = dict(self._members)
        twin._entries = list(self._entries)
        twin._hashes = list(self._hashes)
        twin._rotation_epoch = self._rotation_epoch
        return twin

    @property
    def members(self) -> Mapping[str, str]:
        """user -> role ("owner" | "admin" | "member"), read-only, as of now."""
        return MappingProxyType(dict(self._members))  # a snapshot: later entries leave it

    @property
    def epoch(self) -> int:
        """The number of entries applied: the epoch to stamp on key shares."""
        return len(self._entries)

    @property
    def head(self) -> bytes:
        """Hash of the newest entry (32 zero bytes before "create")."""
        return self._hashes[-1] if self._hashes else ZERO_HASH

    @property
    def rotation_epoch(self) -> int:
        """Epoch of the newest "remove" or "leave" (0 if none): no session made before it
        may be sent under (`check_send`)."""
        return self._rotation_epoch

    @property
    def entries(self) -> tuple[MemberEntry, ...]:
        return tuple(self._entries)

    def hash_at(self, epoch: int) -> bytes:
        """Hash of the entry at `epoch` (1..self.epoch); epoch 0 is the zero hash."""
        if epoch == 0:
            return ZERO_HASH
        if not 1 <= epoch <= self.epoch:
            raise IndexError(f"no entry at epoch {epoch} (head is at {self.epoch})")
        return self._hashes[epoch - 1]

    def role_of(self, user: str) -> str | None:
        return self._members.get(user)

    def apply(self, entry: MemberEntry, device_key: DeviceKeyLookup) -> bool:
        """Verify `entry` and append it: True. The same entry as the one we hold at its epoch
        (a repeat from the server or gossip): False, nothing changes. Otherwise raise
        `MembershipError` (a `ForkError` for a different valid entry at an epoch we hold),
        checking in the order of docs/e2ee/membership.md, "Verification"."""
        check_shape(entry)
        if entry.channel != self.channel:
            raise MembershipError(
                "channel", f"entry for {entry.channel!r}, this log is {self.channel!r}"
            )
        if entry.epoch <= self.epoch:
            return self._known_epoch(entry, device_key)
        if entry.epoch != self.epoch + 1:
            raise MembershipError(
                "epoch", f"entry at epoch {entry.epoch}, the next is {self.epoch + 1}"
            )
        if entry.prev_hash != self.head:
            raise MembershipError("prev_hash", f"epoch {entry.epoch} does not link to our head")
        statement = entry.statement()
        _verify(entry, statement, device_key)
        self._check_allowed(entry)
        self._append(entry, entry_hash(statement))
        return True

    def _known_epoch(self, entry: MemberEntry, device_key: DeviceKeyLookup) -> bool:
        """An entry for an epoch we already hold: a repeat, a fork, or just invalid."""
        ours = self._entries[entry.epoch - 1]
        theirs_hash = entry.hash()
        if theirs_hash == self._hashes[entry.epoch - 1]:
            return False
        if entry.prev_hash != self.hash_at(entry.epoch - 1):
            raise MembershipError(
                "prev_hash",
                f"a different entry for epoch {entry.epoch} that does not link to our log",
            )
        _verify(entry, entry.statement(), device_key)
        before = MembershipState(self.channel)
        for earlier in self._entries[: entry.epoch - 1]:
            before._append(earlier, earlier.hash())
        before._check_allowed(entry)  # a forged-but-unauthorised entry is no evidence
        raise ForkError(entry.epoch, ours, entry, theirs_hash)

    def check_head(self, epoch: int, head: bytes) -> bool:
        """Compare a head (epoch, hash) heard outside the server, e.g. gossiped inside an
        encrypted message. True: it matches ours at that epoch. False: it is ahead of us
        (fetch the log and apply the new entries). `ForkError` when it differs at an epoch we
        hold (a heard hash is not a signed entry: ask its sender for the entry if proof is
        needed)."""
        _int(epoch, "epoch", minimum=0)
        _bytes(head, "head", HASH_BYTES)
        if epoch > self.epoch:
            return False
        if head == self.hash_at(epoch):
            return True
        if epoch == 0:
            raise MembershipError("malformed", "the head at epoch 0 is 32 zero bytes")
        raise ForkError(epoch, self._entries[epoch - 1], None, head)

    def _check_allowed(self, entry: MemberEntry) -> None:
        """The rules table: the actor's authority at this state, then the op's validity."""
        op, target, actor = entry.op, entry.target_user, entry.actor_user
        if op == "create":
            if self.epoch != 0:
                raise MembershipError("invalid", "'create' is only the first entry (epoch 1)")
            return
        if self.epoch == 0:
            raise MembershipError("invalid", "a log starts with 'create'")
        actor_role = self._members.get(actor)
        if actor_role is None:
            raise MembershipError("forbidden", f"{actor!r} is not a member")
        target_role = self._members.get(target)
        if op == "leave":
            self._keep_an_owner(actor)
        elif op == "add":
            _require(actor_role in MANAGERS, f"only owners and admins add ({actor!r} is not)")
            _require(
                entry.role == "member" or actor_role == "owner",
                f"only owners add someone as {entry.role}",
            )
            if target_role is not None:
                raise MembershipError("invalid", f"{target!r} is already a member")
        elif op == "remove":
            _require(actor_role in MANAGERS, f"only owners and admins remove ({actor!r} is not)")
            if target_role is None:
                raise MembershipError("invalid", f"{target!r} is not a member")
            _require(
                target_role != "owner" or actor_role == "owner",
                f"an admin cannot remove an owner ({target!r})",
            )
        else:  # "role"
            _require(actor_role == "owner", f"only owners change roles ({actor!r} is not)")
            if target_role is None:
                raise MembershipError("invalid", f"{target!r} is not a member")
            if entry.role == target_role:
                raise MembershipError("invalid", f"{target!r} is already {target_role}")
            if entry.role != "owner":
                self._keep_an_owner(target)

    def _keep_an_owner(self, user: str) -> None:
        """`user` stops being an owner: refuse if no other owner would be left."""
        if self._members.get(user) != "owner":
            return
        if not any(u != user and r == "owner" for u, r in self._members.items()):
            raise MembershipError(
                "invalid", f"{user!r} is the last owner: make another owner first"
            )

    def _append(self, entry: MemberEntry, digest: bytes) -> None:
        """Apply an entry already verified and allowed."""
        if entry.op in ("create", "add", "role"):
            self._members[entry.target_user] = entry.role
        else:
            del self._members[entry.target_user]
            self._rotation_epoch = entry.epoch
        self._entries.append(entry)
        self._hashes.append(digest)


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise MembershipError("forbidden", reason)


def _verify(entry: MemberEntry, statement: bytes, device_key: DeviceKeyLookup) -> None:
    key = device_key(entry.actor_user, entry.actor_device)
    if key is None:
        raise MembershipError(
            "unknown_device",
            f"no verified device {entry.actor_device!r} of {entry.actor_user!r}",
        )
    try:
        VerifyKey(key).verify(statement, entry.sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        raise MembershipError(
            "signature", f"epoch {entry.epoch} is not signed by that device's key"
        ) from None


# -- what a client does with a verified state --------------------------------------------------


def recipients(state: MembershipState) -> set[str]:
    """The only users whose (cross-signed) devices may get this room's key shares."""
    return set(state.members)


def must_rotate(old: MembershipState, new: MembershipState) -> bool:
    """Whether a sender must start a new Megolm session between `old` and `new`: when someone
    was removed or left in between (even if added again since). Additions do not: a new member
    gets the current session at its current index, which opens no earlier message. Role
    changes do not either: they change who may manage, not who reads."""
    if old.channel != new.channel:
        raise ValueError("states of different rooms")
    return new.rotation_epoch > old.rotation_epoch


def check_send(session_epoch: int, state: MembershipState) -> None:
    """Refuse (`stale_session`) to send under a session created at `session_epoch` when a
    removal or leave happened since, or when the session claims an epoch the verified log has
    not reached (our state went back: never send on a log we cannot see)."""
    if session_epoch < state.rotation_epoch:
        raise MembershipError(
            "stale_session",
            f"the session is from epoch {session_epoch}, someone left at epoch "
            f"{state.rotation_epoch}: start a new session",
        )
    if session_epoch > state.epoch:
        raise MembershipError(
            "stale_session",
            f"the session is from epoch {session_epoch}, the verified log is at {state.epoch}",
        )


def check_received(share_epoch: int, sender_user: str, state: MembershipState) -> None:
    """Judge a key share (or message) by its sender's user and the membership epoch it was
    stamped with: `behind` when the stamp is ahead of our verified log (fetch the log, apply,
    and judge again; still behind: the server withholds entries, surface it), `not_member`
    when the sender is not a member of the room as the verified log says."""
    if share_epoch > state.epoch:
        raise MembershipError(
            "behind",
            f"stamped with epoch {share_epoch}, our verified log is at {state.epoch}: "
            "fetch the log first",
        )
    if sender_user not in state.members:
        raise MembershipError("not_member", f"{sender_user!r} is not a member of {state.channel}")


def diff(state: MembershipState, server_members: Iterable[str]) -> tuple[set[str], set[str]]:
    """(extra_on_server, missing_on_server): users the server's `members` reply lists that the
    verified log does not (never share keys with them: surface it), and log members the server
    leaves out (banned, removed through the HTTP API without a signed entry, or withheld)."""
    listed = set(server_members)
    verified = set(state.members)
    return listed - verified, verified - listed
