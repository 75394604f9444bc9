"""Issue 23, part B: log lines carry no personal data by default.

A real node logs at `debug` (everything uvicorn and the websockets library have to say); a real
client connects with a token and another secret in the query string, authenticates with a
token in its `auth` frame and sends a location, and an HTTP request carries a query string too.
The connection must be logged (the control: uvicorn's `[accepted]` line), but without the
client's address, the query string or any token; with `RT_LOG_CLIENT_IPS=1` the address is
there (the control that the test would see it).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
from conftest import Node, base_env, token
from wire import Raw, plain, until

ACCEPTED = '"WebSocket /ws" [accepted]'


class DebugNode(Node):
    """A `Node` that logs everything (`--log-level debug`)."""

    log_level = "debug"


async def _a_logged_session(tmp_path: Path, **env: str) -> tuple[str, dict[str, Any]]:
    """Run a node, make a logged connection full of secrets; its log and the secrets."""
    node = DebugNode(base_env(tmp_path / "n", **env), "n").start()
    try:
        jwt = token(f"otto-{uuid.uuid4().hex[:5]}")
        other = f"q-{uuid.uuid4().hex}"
        raw = await Raw.open(f"{node.url}?token={jwt}&session={other}", jwt)
        client = raw.ws.local_address
        await raw.ok("subscribe", channel="public:square")
        text = f"meet me at {uuid.uuid4().hex}"  # a message body is personal data too
        await raw.ok("publish", channel="public:square", client_msg_id="m1", body=plain(text))

        def logged() -> bool:
            return ACCEPTED in node.log()

        await until(logged, 10, what="the connection to be logged")
        r = await asyncio.to_thread(httpx.get, f"{node.http}/healthz?api_key={other}")
        assert r.status_code == 200
        await raw.close()
    finally:
        node.stop()
    address = f"{client[0]}:{client[1]}"
    return node.log(), {"jwt": jwt, "other": other, "client": address, "text": text}


async def test_no_client_address_query_string_or_token_in_any_log_line(tmp_path: Path) -> None:
    log, secret = await _a_logged_session(tmp_path)
    accepted = [line for line in log.splitlines() if ACCEPTED in line]
    assert accepted and all(" - " in line for line in accepted), accepted
    assert secret["client"] not in log
    signature = secret["jwt"].rsplit(".", 1)[1]
    assert secret["jwt"] not in log and signature[:16] not in log and signature[-16:] not in log
    assert secret["text"] not in log
    assert secret["other"] not in log
    assert "?token=" not in log and "?api_key=" not in log


async def test_client_addresses_are_logged_when_the_operator_asks(tmp_path: Path) -> None:
    log, secret = await _a_logged_session(tmp_path, RT_LOG_CLIENT_IPS="1")
    assert secret["client"] in log  # the control: the test would see an address
    assert secret["jwt"].rsplit(".", 1)[1][-16:] not in log and secret["other"] not in log
