"""The ASGI application: `/ws`, the HTTP server API (docs/protocol-v1.md section 9), health and
metrics.

The server API is for the app's own backend and takes `Authorization: Bearer $RT_API_KEY`;
it is documented in `realtime/openapi.json`, served at `/openapi.json`.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from realtime_safety.channels.body import parse_body
from realtime_safety.channels.hub import message_item
from realtime_safety.channels.names import parse_channel
from realtime_safety.channels.service import SERVER_USER
from realtime_safety.protocol import (
    CLOSE_GOING_AWAY,
    JSON,
    ProtocolError,
    arg_int,
    choose_codec,
    require_str,
    valid_user_id,
)

from .access import contacts_removed
from .connection import Connection
from .metrics import CONTENT_TYPE
from .node import Node
from .pages import console, favicon, landing, openapi

log = logging.getLogger("realtime.server")

_STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "too_large": 413,
    "rate_limited": 429,
    "conflict": 409,
    "unavailable": 503,
    "internal": 500,
}
MAX_API_BODY = 256 * 1024


class ApiResponse(JSONResponse):
    """JSON with bytes as padded base64, exactly as the `rt.v1.json` wire format."""

    def render(self, content: Any) -> bytes:
        return JSON.encode(content).encode()


def _error(err: ProtocolError) -> Response:
    return ApiResponse({"error": err.to_error()}, status_code=_STATUS[err.code])


def _node(request: Request | WebSocket) -> Node:
    node: Node = request.app.state.node
    return node


def api(handler: Any) -> Any:
    """Bearer-key check and error mapping for server API endpoints."""

    async def endpoint(request: Request) -> Response:
        key = _node(request).settings.api_key
        if key is None:
            return _error(ProtocolError("unavailable", "the server API is off: set RT_API_KEY"))
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return _error(ProtocolError("unauthorized", "missing or wrong API key"))
        try:
            response: Response = await handler(request, _node(request))
            return response
        except ProtocolError as err:
            return _error(err)

    return endpoint


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_API_BODY:
        raise ProtocolError("too_large", f"request body over {MAX_API_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise ProtocolError("bad_request", "the request body must be JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "the request body must be a JSON object")
    return data


def _room(request: Request) -> str:
    ch = parse_channel(request.path_params["channel"])
    if ch.namespace != "room":
        raise ProtocolError("bad_request", "membership is managed for room: channels only")
    return ch.name


def _user(request: Request) -> str:
    user = request.path_params["user"]
    if not valid_user_id(user) or user.startswith("@"):
        raise ProtocolError("bad_request", "invalid user id")
    return str(user)


def _query_int(request: Request, name: str, **bounds: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ProtocolError("bad_request", f"'{name}' must be an integer") from None
    return arg_int({name: value}, name, **bounds)


@api
async def put_member(request: Request, node: Node) -> Response:
    channel, user = _room(request), _user(request)
    added = await node.channels.add_member(channel, user)
    await node.membership_changed(channel, user, added=True)
    return ApiResponse(
        {"channel": channel, "user": user, "added": added}, status_code=201 if added else 200
    )


@api
async def delete_member(request: Request, node: Node) -> Response:
    channel, user = _room(request), _user(request)
    removed = await node.channels.remove_member(channel, user)
    await node.membership_changed(channel, user, added=False)
    if not removed:
        raise ProtocolError("not_found", f"{user} is not a member of {channel}")
    return Response(status_code=204)


@api
async def list_members(request: Request, node: Node) -> Response:
    channel = _room(request)
    limit = _query_int(request, "limit", minimum=1, maximum=1000) or 100
    after = request.query_params.get("after")
    members = await node.channels.members(channel, limit, after)
    return ApiResponse(
        {
            "channel": channel,
            "members": members,
            "next": members[-1] if len(members) == limit else None,
        }
    )


@api
async def post_message(request: Request, node: Node) -> Response:
    ch = parse_channel(request.path_params["channel"])
    data = await _json_body(request)
    cmid = require_str(data, "client_msg_id", max_len=64)
    plaintext = ch.namespace in node.settings.plaintext_namespaces or ch.namespace == "user"
    body = parse_body(
        data.get("body"),
        JSON,
        plaintext_allowed=plaintext,
        max_bytes=node.settings.limits.max_body_bytes,
    )
    appended = await node.channels.publish(ch.name, SERVER_USER, None, cmid, body)
    return ApiResponse(
        {
            "channel": ch.name,
            "seq": appended.message.seq,
            "ts": appended.message.ts,
            "duplicate": appended.duplicate,
        },
        status_code=200 if appended.duplicate else 201,
    )


@api
async def get_messages(request: Request, node: Node) -> Response:
    ch = parse_channel(request.path_params["channel"])
    before = _query_int(request, "before_seq", minimum=1)
    limit = _query_int(request, "limit", minimum=1, maximum=200) or 50
    messages, has_more = await node.channels.history(ch.name, before, limit)
    return ApiResponse(
        {"channel": ch.name, "messages": [message_item(m) for m in messages], "has_more": has_more}
    )


_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")  # E.164


@api
async def put_contacts(request: Request, node: Node) -> Response:
    """Replace a user's emergency contacts: [{tier, user, phone?} | {tier, phone}]. A contact
    with both is alerted in the app, and by SMS if the app does not confirm in time."""
    owner = _user(request)
    data = await _json_body(request)
    contacts = data.get("contacts")
    if not isinstance(contacts, list) or len(contacts) > 50:
        raise ProtocolError("bad_request", "'contacts' must be a list of at most 50")
    clean = []
    for c in contacts:
        if not isinstance(c, dict):
            raise ProtocolError("bad_request", "each contact must be an object")
        tier = c.get("tier", 1)
        if isinstance(tier, bool) or not isinstance(tier, int) or not 1 <= tier <= 5:
            raise ProtocolError("bad_request", "contact tier must be 1-5")
        user, phone = c.get("user"), c.get("phone")
        if user is not None and not (isinstance(user, str) and valid_user_id(user)):
            raise ProtocolError("bad_request", "a contact's user must be a valid user id")
        if phone is not None and not (isinstance(phone, str) and _PHONE.fullmatch(phone)):
            raise ProtocolError("bad_request", "a contact's phone must be an E.164 number")
        if user is None and phone is None:
            raise ProtocolError("bad_request", "a contact needs a user id or an E.164 phone")
        contact = {"tier": tier, "user": user, "phone": phone}
        clean.append({k: v for k, v in contact.items() if v is not None})
    removed = await node.channels.bounded(
        "contacts", node.alerts.lane.run(node.alerts.set_contacts(owner, clean))
    )
    await contacts_removed(node, removed)  # their access to the owner's alerts ends at once
    return ApiResponse({"user": owner, "contacts": clean})


@api
async def get_contacts(request: Request, node: Node) -> Response:
    owner = _user(request)
    contacts = await node.channels.bounded(
        "contacts", node.alerts.lane.run(node.alerts.contacts(owner))
    )
    return ApiResponse({"user": owner, "contacts": contacts})


@api
async def revoke_tokens(request: Request, node: Node) -> Response:
    """Every token of the user issued up to now stops working (a demotion, a lost phone):
    their sessions close with 4003, and only tokens issued later are accepted."""
    user = _user(request)
    done = await node.channels.bounded("tokens", node.moderation.revoke_tokens("api", user))
    return ApiResponse(done)


@api
async def put_push_token(request: Request, node: Node) -> Response:
    user = _user(request)
    token = request.path_params["token"]
    if not 1 <= len(token) <= 4096:
        raise ProtocolError("bad_request", "invalid push token")
    data = await _json_body(request)
    platform = data.get("platform", "android")
    if platform not in ("android", "ios", "web"):
        raise ProtocolError("bad_request", "'platform' must be android, ios or web")
    await node.channels.bounded(
        "push token",
        node.store.docs.put(
            "push_tokens", f"{user}|{token}", {"token": token, "platform": platform}
        ),
    )
    return ApiResponse({"user": user, "platform": platform}, status_code=201)


@api
async def delete_push_token(request: Request, node: Node) -> Response:
    user = _user(request)
    removed = await node.channels.bounded(
        "push token",
        node.store.docs.delete("push_tokens", f"{user}|{request.path_params['token']}"),
    )
    return Response(status_code=204 if removed else 404)


@api
async def get_alert(request: Request, node: Node) -> Response:
    alert = await node.channels.bounded(
        "alert", node.alerts.lane.run(node.alerts.alert(request.path_params["alert_id"]))
    )
    status = await node.channels.bounded(
        "alert",
        node.alerts.lane.run(node.alerts.status(alert["owner"], True, {"alert_id": alert["id"]})),
    )
    alert.pop("_v", None)
    return ApiResponse({**alert, "recipients": status["recipients"]})


@api
async def get_audit(request: Request, node: Node) -> Response:
    """The moderators' audit log, oldest first, from `since` (ms)."""
    since = _query_int(request, "since") or 0
    limit = _query_int(request, "limit", minimum=1, maximum=1000) or 100
    entries = await node.channels.bounded("audit", node.moderation.audit_log(since, limit))
    return ApiResponse({"entries": entries})


async def twilio_status(request: Request) -> Response:
    """Twilio's status callback: the signature is checked with Twilio's own validator
    against RT_PUBLIC_URL + path, then the status is folded into the alert's deliveries."""
    from twilio.request_validator import RequestValidator

    node = _node(request)
    token, public = node.settings.twilio_auth_token, node.settings.public_url
    if not token or not public:
        return _error(ProtocolError("not_found", "Twilio is not configured"))
    form = await request.form()
    params = {k: str(v) for k, v in form.items()}
    url = public.rstrip("/") + request.url.path
    signature = request.headers.get("x-twilio-signature", "")
    if not RequestValidator(token).validate(url, params, signature):
        return _error(ProtocolError("forbidden", "bad Twilio signature"))
    sid, status = params.get("MessageSid"), params.get("MessageStatus")
    if sid and status:
        delivery = node.alerts.delivery
        await node.channels.bounded(
            "twilio",
            node.alerts.lane.run(delivery.provider_status(sid, status, params.get("ErrorCode"))),
        )
    return Response(status_code=204)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "node": _node(request).settings.node_id})


async def readyz(request: Request) -> Response:
    """Ready when the node can serve: its store and broker answer, it is not draining, and
    alerts can be queued (every route's delivery queue answers)."""
    node = _node(request)
    checks = await node.ready()
    if "alert_queue" not in checks:
        checks["alert_queue"] = await node.alerts.lane.run(node.alerts.delivery.ready())
    ok = all(checks.values())
    return JSONResponse(
        {"ready": ok, "node": node.settings.node_id, **checks}, status_code=200 if ok else 503
    )


async def metrics(request: Request) -> Response:
    node = _node(request)
    return Response(node.metrics.render(), media_type=CONTENT_TYPE)


async def ws_endpoint(websocket: WebSocket, node: Node) -> None:
    if node.draining:
        await websocket.close(CLOSE_GOING_AWAY)
        return
    codec = choose_codec(list(websocket.scope.get("subprotocols", [])))
    await websocket.accept(subprotocol=codec.name if codec else None)
    await Connection(websocket, node, codec or JSON).run()


class NodeApp:
    """The node's ASGI app. `/ws` goes straight to its handler: a socket lives for hours and
    should not keep a middleware stack of suspended frames alive (several KB each); every
    other path goes through Starlette."""

    def __init__(self, node: Node, http: Starlette) -> None:
        self.node = node
        self.http = http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/ws":
            await ws_endpoint(WebSocket(scope, receive, send), self.node)
        else:
            await self.http(scope, receive, send)


def create_app(node: Node) -> NodeApp:
    app = Starlette(
        routes=[
            Route("/", landing),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
            Route("/console", console),
            Route("/favicon.ico", favicon),
            Route("/v1/channels/{channel}/members", list_members, methods=["GET"]),
            Route("/v1/channels/{channel}/members/{user}", put_member, methods=["PUT"]),
            Route("/v1/channels/{channel}/members/{user}", delete_member, methods=["DELETE"]),
            Route("/v1/channels/{channel}/messages", post_message, methods=["POST"]),
            Route("/v1/channels/{channel}/messages", get_messages, methods=["GET"]),
            Route("/v1/users/{user}/contacts", put_contacts, methods=["PUT"]),
            Route("/v1/users/{user}/contacts", get_contacts, methods=["GET"]),
            Route("/v1/users/{user}/tokens/revoke", revoke_tokens, methods=["POST"]),
            Route("/v1/users/{user}/push-tokens/{token}", put_push_token, methods=["PUT"]),
            Route("/v1/users/{user}/push-tokens/{token}", delete_push_token, methods=["DELETE"]),
            Route("/v1/alerts/{alert_id}", get_alert, methods=["GET"]),
            Route("/v1/twilio/status", twilio_status, methods=["POST"]),
            Route("/v1/audit", get_audit, methods=["GET"]),
        ]
    )
    app.state.node = node
    return NodeApp(node, app)
