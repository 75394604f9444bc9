"""No personal data in log lines by default (issue 23): every record, ours, uvicorn's and the
websockets library's, passes `Redact` on its way to the handler.

- Client addresses: uvicorn names the client first in its connection lines (`'%s - "WebSocket
  %s" [accepted]'`, the access log, the `%s:%d - ` trace prefix); they become `-` unless the
  operator turns them on (`RT_LOG_CLIENT_IPS=1`).
- Query strings never reach a line (a client may put a token there): `/ws?token=…` is `/ws`.
- Tokens: anything shaped like a JWT, and the values of credential and forwarding headers in
  the websockets library's debug lines (`Authorization`, `Cookie`, `Sec-WebSocket-Protocol`,
  `X-Forwarded-For`, …), are replaced; its frame dumps (which hold `auth` tokens, message
  bodies and locations) are reduced to their kind and size.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_QUERY = re.compile(r"(/[^\s?\"'#]*)\?[^\s\"'#]*")
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[^\s\"']+")
_ADDRESS = re.compile(r"^\[?[0-9a-fA-F.:]+\]?(:\d+)?$")
_SECRET_HEADERS = frozenset(
    {
        "authorization",
        "cookie",
        "set-cookie",
        "sec-websocket-protocol",
        "sec-websocket-key",
        "sec-websocket-accept",
        "x-forwarded-for",
        "x-real-ip",
        "forwarded",
        "true-client-ip",
        "cf-connecting-ip",
        "x-api-key",
    }
)


class Redact(logging.Filter):
    def __init__(self, *, client_ips: bool = False) -> None:
        super().__init__()
        self._client_ips = client_ips

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = self._args(record.name, str(record.msg), args)
        record.msg = scrub(record.getMessage())
        record.args = None
        return True

    def _args(self, name: str, msg: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        out = list(args)
        # uvicorn: the client's address leads its connection lines (or is the trace prefix)
        first = out[0]
        if not self._client_ips and name.startswith("uvicorn") and isinstance(first, str):
            head = first.removesuffix(" - ")
            if msg.startswith("%s") and _ADDRESS.match(head) and (":" in head or "." in head):
                out[0] = "- " if first.endswith(" - ") else "-"
        # websockets (debug): request/response headers and frames
        if msg in ("< %s: %s", "> %s: %s") and len(out) == 2:
            if str(out[0]).lower() in _SECRET_HEADERS:
                out[1] = "[redacted]"
        elif msg in ("< %s", "> %s") and len(out) == 1 and type(out[0]).__name__ == "Frame":
            frame = out[0]
            out[0] = f"{frame.opcode.name} frame ({len(frame.data)} bytes)"
        return tuple(out)


def scrub(text: str) -> str:
    """`text` without query strings or tokens."""
    text = _QUERY.sub(r"\1", text)
    text = _JWT.sub("[token]", text)
    return _BEARER.sub(r"\1 [redacted]", text)


def install(*, client_ips: bool) -> None:
    """On every handler of the root logger (where uvicorn's and websockets' loggers go)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(Redact(client_ips=client_ips))
