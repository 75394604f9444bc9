"""Who is calling: the identity a verified token gives a connection, and the rules for user ids
and roles (docs/protocol.md, "Tokens")."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = frozenset({"user", "moderator", "responder"})
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-")


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    roles: frozenset[str]
    expires_at: float
    device: str | None = None
    issued_at: float | None = None  # the token's `iat` (seconds), if it has one

    @property
    def is_moderator(self) -> bool:
        return "moderator" in self.roles


def valid_user_id(user: object) -> bool:
    return isinstance(user, str) and 1 <= len(user) <= 128 and set(user) <= _USER_CHARS
