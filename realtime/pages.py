"""The node's static pages: `/` (what this server is), the moderators' console, the OpenAPI
document (read from this package's data files wherever it is installed) and the favicon."""

from __future__ import annotations

import html
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

# This package's data files (openapi.json, console/), wherever it is installed: never by the
# folder name, which only resolves from a checkout.
_RESOURCES = resources.files(__package__ or "realtime_safety.realtime")
_OPENAPI: bytes | None = None


async def openapi(request: Request) -> Response:
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = _RESOURCES.joinpath("openapi.json").read_bytes()
    return Response(_OPENAPI, media_type="application/json")


_CONSOLE: bytes | None = None
_CONSOLE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


async def console(request: Request) -> Response:
    """The moderators' web console: one self-contained page; it signs in over /ws with a
    moderator token, so it holds no privileges of its own."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = _RESOURCES.joinpath("console/index.html").read_bytes()
    return Response(
        _CONSOLE,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": _CONSOLE_CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


# The console's icon (console/index.html has it inline, so the console never asks for it),
# for what a browser opens without a page of ours around it (/openapi.json, /healthz), where
# it asks for /favicon.ico. SVG under the .ico name: browsers go by the content type.
_FAVICON = (
    b"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'>"
    b"<rect width='16' height='16' rx='3' fill='#1d2b3a'/>"
    b"<circle cx='8' cy='8' r='4' fill='#c0392b'/></svg>"
)


async def favicon(request: Request) -> Response:
    """`/favicon.ico`: the console's icon, cached for 30 days."""
    return Response(
        _FAVICON,
        media_type="image/svg+xml",
        headers={
            "Cache-Control": "public, max-age=2592000",
            "Content-Security-Policy": "default-src 'none'",  # an image, never a document
            "X-Content-Type-Options": "nosniff",
        },
    )


_LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>realtime</title>
<link rel="icon" href="data:,">
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em}
code{background:#f2f2f2;padding:1px 4px}</style></head><body>
<h1>realtime</h1>
<p>A chat and safety-alert server: node <code>%(node)s</code>.</p>
<ul>
<li>WebSocket: <code>/ws</code> (protocol <code>rt.v1.json</code> or <code>rt.v1.msgpack</code>;
the first frame is <code>auth</code> with a JWT)</li>
<li><a href="/console">Moderators' console</a> (sign in with a moderator's token)</li>
<li><a href="/openapi.json">OpenAPI</a> of the HTTP API (<code>/v1/...</code>, bearer API key)</li>
<li><a href="/healthz">/healthz</a> · <a href="/readyz">/readyz</a> ·
<a href="/metrics">/metrics</a></li>
</ul>
<p>The protocol, a tutorial and the configuration are in the repository's <code>docs/</code>
and README.</p>
</body></html>
"""


async def landing(request: Request) -> Response:
    """`/`: what this server is and where its parts are (for whoever opens it in a browser)."""
    page = _LANDING % {"node": html.escape(request.app.state.node.settings.node_id)}
    return Response(
        page,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        },
    )
