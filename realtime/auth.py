"""JWT verification (docs/protocol-v1.md section 3) and development tokens.

Tokens are verified with an explicit algorithm list from the configuration, so `alg: none`
and algorithm-confusion tokens are rejected. Required claims: `sub`, `exp`.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from realtime_safety.protocol import ROLES, Identity, ProtocolError, valid_user_id

from .config import Settings


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self._key = settings.jwt_key
        self._algorithms = list(settings.jwt_algorithms)

    def verify(self, token: object) -> Identity:
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise ProtocolError("unauthorized", "'token' must be a JWT string")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"require": ["sub", "exp"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError("unauthorized", "token expired") from None
        except jwt.InvalidTokenError as exc:
            raise ProtocolError("unauthorized", f"invalid token: {exc}") from None
        user = claims["sub"]
        if not valid_user_id(user) or user.startswith("@"):
            raise ProtocolError("unauthorized", "claim 'sub' is not a valid user id")
        roles_claim = claims.get("roles", ["user"])
        if not isinstance(roles_claim, list) or not all(isinstance(r, str) for r in roles_claim):
            raise ProtocolError("unauthorized", "claim 'roles' must be a list of strings")
        unknown = set(roles_claim) - ROLES
        if unknown:
            raise ProtocolError("unauthorized", f"unknown role {sorted(unknown)[0]!r}")
        device = claims.get("device")
        if device is not None and not (isinstance(device, str) and 1 <= len(device) <= 64):
            raise ProtocolError("unauthorized", "claim 'device' must be a string of 1-64 chars")
        exp = claims["exp"]
        if not isinstance(exp, int | float):
            raise ProtocolError("unauthorized", "claim 'exp' must be a number")
        iat = claims.get("iat")
        if iat is not None and (isinstance(iat, bool) or not isinstance(iat, int | float)):
            raise ProtocolError("unauthorized", "claim 'iat' must be a number")
        return Identity(
            user=user, roles=frozenset(roles_claim), expires_at=float(exp), device=device,
            issued_at=None if iat is None else float(iat),
        )  # fmt: skip


def issue_token(
    settings: Settings,
    user: str,
    roles: list[str],
    *,
    ttl_s: int = 3600,
    device: str | None = None,
) -> str:
    """A development token signed with RT_JWT_SECRET (HS256 deployments only)."""
    if not isinstance(settings.jwt_key, str) or "BEGIN" in settings.jwt_key:
        raise ValueError("tokens can only be issued with RT_JWT_SECRET (HS256)")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "roles": roles, "iat": now, "exp": now + ttl_s}
    if device:
        claims["device"] = device
    return jwt.encode(claims, settings.jwt_key, algorithm=settings.jwt_algorithms[0])
