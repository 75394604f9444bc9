"""Channel names (docs/protocol-v1.md section 4): `namespace:rest`, 1-255 bytes of
[A-Za-z0-9_.:@-]."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from realtime_safety.protocol import ProtocolError

NAMESPACES: Final = frozenset({"room", "public", "user", "alert"})
_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,255}")


@dataclass(frozen=True, slots=True)
class ChannelName:
    name: str
    namespace: str
    rest: str


def parse_channel(value: object) -> ChannelName:
    """Validate a channel name; `bad_request` says exactly what is wrong."""
    if not isinstance(value, str):
        raise ProtocolError("bad_request", "'channel' must be a string")
    if not _NAME.fullmatch(value):
        raise ProtocolError("bad_request", "'channel' must be 1-255 characters of [A-Za-z0-9_.:@-]")
    namespace, sep, rest = value.partition(":")
    if not sep or not rest:
        raise ProtocolError("bad_request", "'channel' must be namespace:name")
    if namespace not in NAMESPACES:
        raise ProtocolError(
            "bad_request",
            f"unknown namespace {namespace!r}: use one of {', '.join(sorted(NAMESPACES))}",
        )
    return ChannelName(value, namespace, rest)
