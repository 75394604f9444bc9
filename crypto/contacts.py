"""Other users' keys for E2EE v2 (docs/e2ee/identity.md, sections 7 and 8).

- `fingerprint`, `fingerprint_digits`, `safety_number`: what two people compare (Signal's
  numeric fingerprint construction) to verify each other's user keys.
- `verification_payload`, `verification_matches`: the same check as a scanned QR code.
- `ContactBook`: the client's record of other users' keys (trust on first use, verified,
  blocked on an unconfirmed change) and the `Change` a new key raises.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from .e2ee import CryptoError, pack
from .identity import (
    KEY_BYTES,
    UserKeyStatement,
    _need_bytes,
    _need_text,
    verify_user_key,
)

__all__ = [
    "FINGERPRINT_ITERATIONS",
    "Change",
    "ContactBook",
    "ContactState",
    "fingerprint",
    "fingerprint_digits",
    "safety_number",
    "verification_matches",
    "verification_payload",
]

FINGERPRINT_ITERATIONS = 5200
_FINGERPRINT_VERSION = b"\x00\x00"


# --- safety numbers and the QR payload ---------------------------------------------------------


def fingerprint(user: str, user_pub: bytes) -> bytes:
    """One side's fingerprint (64 bytes), as Signal's NumericFingerprintGenerator (version 0)
    computes it: h = 0x0000 || key || user id (UTF-8); then 5200 times h = SHA-512(h || key)."""
    _need_text("user", user)
    _need_bytes("user key", user_pub, KEY_BYTES)
    h = _FINGERPRINT_VERSION + user_pub + user.encode()
    for _ in range(FINGERPRINT_ITERATIONS):
        h = hashlib.sha512(h + user_pub).digest()
    return h


def fingerprint_digits(user: str, user_pub: bytes) -> str:
    """30 digits: the fingerprint's first 30 bytes as six 5-byte big-endian integers, each
    mod 100000 and written as 5 digits."""
    h = fingerprint(user, user_pub)
    return "".join(f"{int.from_bytes(h[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5))


def safety_number(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> str:
    """The 60-digit number two users compare, as 12 groups of 5 digits separated by spaces;
    the two halves are sorted, so both sides see the same number."""
    halves = sorted([fingerprint_digits(user_a, key_a), fingerprint_digits(user_b, key_b)])
    digits = "".join(halves)
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))


def _sorted_pair(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> list[Any]:
    """The two (user, key) pairs in byte order (user id as UTF-8, then key): the same on both
    sides, whatever the language's own string order is."""
    pairs = sorted([(user_a.encode(), key_a, user_a), (user_b.encode(), key_b, user_b)])
    return [pairs[0][2], pairs[0][1], pairs[1][2], pairs[1][1]]


def verification_payload(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> bytes:
    """What one side shows as a QR code and the other scans: both user ids and keys."""
    for user, key in ((user_a, key_a), (user_b, key_b)):
        _need_text("user", user)
        _need_bytes("user key", key, KEY_BYTES)
    return pack(["rt.v2.verify", *_sorted_pair(user_a, key_a, user_b, key_b)])


def verification_matches(
    scanned: bytes, me: str, my_key: bytes, them: str, their_key: bytes
) -> bool:
    """True when a scanned payload names exactly these two users with exactly these keys."""
    return hmac.compare_digest(scanned, verification_payload(me, my_key, them, their_key))


# --- the contact book --------------------------------------------------------------------------

ContactState = Literal["unverified", "verified", "blocked"]
_CONTACTS_TAG = "rt.v2.contacts"


@dataclass(frozen=True)
class Change:
    """A contact's user key changed. `kind` is "rotation" when the old key signed the new one
    (accepted, nothing to confirm) and "reset" otherwise. `blocked`: nothing may be shared with
    the user until the app calls `ContactBook.confirm` (or `verify`) with `new`."""

    user: str
    old: bytes
    new: bytes
    was_verified: bool
    kind: Literal["rotation", "reset"]
    blocked: bool


@dataclass
class _Contact:
    key: bytes  # the key in use (while blocked: the one before the change)
    verified: bool
    pending: bytes | None  # a changed key waiting for the app's confirmation


class ContactBook:
    """Other users' user keys as this client knows them.

    First sight is trust on first use (`unverified`); the app marks a user `verified` after
    the safety numbers matched. A key change raises a `Change`: a rotation co-signed by the
    old key is accepted; a reset of a verified user blocks them (`may_share` False) until the
    app confirms; a reset of an unverified user is accepted (policy "accept") or blocks too
    (policy "block")."""

    def __init__(self, *, on_unverified_change: Literal["accept", "block"] = "accept") -> None:
        if on_unverified_change not in ("accept", "block"):
            raise ValueError("on_unverified_change must be 'accept' or 'block'")
        self.on_unverified_change = on_unverified_change
        self._contacts: dict[str, _Contact] = {}

    def observe(
        self, user: str, user_pub: bytes, rotation: Sequence[UserKeyStatement] = ()
    ) -> Change | None:
        """Record the key the directory shows for `user`. `rotation`: the user-key statements
        leading from the key on record to `user_pub` (one per rotation, oldest first); when
        they all verify, the change is a rotation. Returns the change, if any."""
        _need_text("user", user)
        _need_bytes("user key", user_pub, KEY_BYTES)
        c = self._contacts.get(user)
        if c is None:
            self._contacts[user] = _Contact(user_pub, False, None)
            return None
        if user_pub == c.key or user_pub == c.pending:
            return None
        old = c.key
        if _rotation_holds(user, old, user_pub, rotation):
            self._contacts[user] = _Contact(user_pub, c.verified, None)
            return Change(user, old, user_pub, c.verified, "rotation", False)
        if c.verified or c.pending is not None or self.on_unverified_change == "block":
            c.pending = user_pub
            return Change(user, old, user_pub, c.verified, "reset", True)
        c.key = user_pub
        return Change(user, old, user_pub, False, "reset", False)

    def verify(self, user: str, user_pub: bytes) -> None:
        """The app compared safety numbers (or scanned the QR code) for `user_pub`. Verifying
        a pending key also confirms it. CryptoError if `user_pub` is neither the key on record
        nor the pending one."""
        _need_text("user", user)
        _need_bytes("user key", user_pub, KEY_BYTES)
        c = self._contacts.get(user)
        if c is None:
            self._contacts[user] = _Contact(user_pub, True, None)
        elif user_pub == c.pending:
            self._contacts[user] = _Contact(user_pub, True, None)
        elif user_pub == c.key:
            c.verified = True
        else:
            raise CryptoError("that key is not the one on record for the user")

    def confirm(self, user: str, new_pub: bytes) -> None:
        """The app accepts a pending changed key without verifying it: the user becomes
        `unverified` with `new_pub`, and may be shared with again."""
        c = self._contacts.get(user)
        if c is None or c.pending is None or c.pending != new_pub:
            raise CryptoError("no pending change to that key")
        self._contacts[user] = _Contact(new_pub, False, None)

    def state(self, user: str) -> ContactState | None:
        """The user's state; None for a user never seen."""
        c = self._contacts.get(user)
        if c is None:
            return None
        if c.pending is not None:
            return "blocked"
        return "verified" if c.verified else "unverified"

    def key(self, user: str) -> bytes | None:
        """The user key in use (while blocked: the one from before the change)."""
        c = self._contacts.get(user)
        return None if c is None else c.key

    def pending(self, user: str) -> bytes | None:
        """The changed key waiting for confirmation, if any."""
        c = self._contacts.get(user)
        return None if c is None else c.pending

    def may_share(self, user: str) -> bool:
        """Whether keys may go to this user's devices: known, and not blocked."""
        return self.state(user) in ("unverified", "verified")

    def to_bytes(self) -> bytes:
        """The book (not the policy, which is the app's setting) as msgpack."""
        rows = [
            [user, c.key, c.verified, b"" if c.pending is None else c.pending]
            for user, c in sorted(self._contacts.items())
        ]
        return pack([_CONTACTS_TAG, rows])

    @classmethod
    def from_bytes(
        cls, data: bytes, *, on_unverified_change: Literal["accept", "block"] = "accept"
    ) -> ContactBook:
        book = cls(on_unverified_change=on_unverified_change)
        try:
            tag, rows = msgpack.unpackb(data, raw=False)
            if tag != _CONTACTS_TAG:
                raise CryptoError("not a contact book")
            for user, key, verified, pending in rows:
                _need_text("user", user)
                _need_bytes("user key", key, KEY_BYTES)
                if not isinstance(verified, bool):
                    raise CryptoError("verified must be a boolean")
                if pending != b"":
                    _need_bytes("pending key", pending, KEY_BYTES)
                book._contacts[user] = _Contact(key, verified, pending or None)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise CryptoError("not a contact book") from None
        return book


def _rotation_holds(user: str, old: bytes, new: bytes, chain: Sequence[UserKeyStatement]) -> bool:
    """Whether `chain` leads from `old` to `new` for `user`, each step a verified rotation
    signed by the key before it."""
    if not chain:
        return False
    current = old
    for st in chain:
        if st.user != user or not st.is_rotation or st.previous != current:
            return False
        try:
            verify_user_key(st)
        except CryptoError:
            return False
        current = st.user_pub
    return current == new
