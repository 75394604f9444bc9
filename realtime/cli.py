"""`realtime serve` runs a node; `realtime token` prints a development token;
`realtime export` / `realtime import` back up and restore (or move) the configured store;
`realtime migrate` brings its schema up to this version without serving.

Bad configuration ends with one line on stderr (`realtime: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import socket
import sys
from pathlib import Path

import uvicorn

from realtime_safety.protocol import ROLES, valid_user_id
from realtime_safety.storage import StoreUnavailable, open_store
from realtime_safety.storage.backup import ImportError_, export_store, import_store
from realtime_safety.storage.sqlite import SqliteStore

from . import config, logs, redact
from . import files as files_mod
from .auth import issue_token
from .node import Node, StartupError
from .server import create_app
from .websocket import RealtimeWebSocketProtocol, handshake_protocol

log = logging.getLogger("realtime")
GIL_SWITCH_S = 0.0005  # see _serve


class _Server(uvicorn.Server):
    """uvicorn, but on SIGTERM our sockets close with 1001 (go elsewhere) before it stops."""

    def __init__(self, cfg: uvicorn.Config, node: Node) -> None:
        super().__init__(cfg)
        self.node = node

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting first
        await self.node.drain()
        await super().shutdown(sockets)
        # uvicorn re-raises the captured signal after serving; a drained node exits 0.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _raise_file_limit() -> int:
    """Every connection is an open file: take the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _banner(host: str, port: int, settings: config.Settings) -> str:
    """Where the node is, printed at start (text logs only: JSON logs are for machines)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    http = f"http://{shown}:{port}"
    lines = [
        f"realtime: node {settings.node_id} serving on {host}:{port}",
        f"  WebSocket  ws://{shown}:{port}/ws",
        f"  HTTP API   {http}/v1/...  (Authorization: Bearer $RT_API_KEY"
        + (")" if settings.api_key else "; off: RT_API_KEY is not set)"),
        f"  console    {http}/console",
        f"  OpenAPI    {http}/openapi.json",
    ]
    if settings.jwt_algorithms[:1] in (("HS256",), ("HS384",), ("HS512",)):  # a shared secret
        lines.append("  tokens     realtime token --user alice  (the same RT_JWT_SECRET[_FILE])")
    lines.append(f"  health     {http}/healthz  {http}/readyz  {http}/metrics")
    return "\n".join(lines)


async def _serve(settings: config.Settings, host: str, port: int, log_level: str) -> None:
    # The alert lane and the store's threads wait for the GIL up to this long at each step
    # while the event loop is busy: 0.5 ms instead of Python's 5 ms halved SOS latency under
    # a chat flood (`python -m realtime_safety.loadtests sos-under-load`).
    sys.setswitchinterval(GIL_SWITCH_S)
    files = _raise_file_limit()
    sock = _listen(host, port)
    node = Node(settings)
    try:
        await node.start()
    except BaseException:
        sock.close()
        raise
    # What start-up made (modules, settings, the node's wiring) lives as long as the process:
    # kept out of the collector's full passes, which stop every thread (the alert lane too).
    # Under a chat flood a full pass took 55-93 ms before, 16-22 ms after.
    gc.collect()
    gc.freeze()
    limits = settings.limits
    cfg = uvicorn.Config(
        create_app(node),
        host=host,
        port=port,
        # uvicorn's sans-I/O protocol plus direct frame writes (realtime/websocket.py).
        ws=RealtimeWebSocketProtocol,
        # A request (or upgrade) not complete in time is closed: no slowloris, no silent sockets.
        http=handshake_protocol(limits.handshake_timeout_s),
        ws_max_size=limits.max_frame_bytes,
        ws_ping_interval=limits.ping_interval_s,
        ws_ping_timeout=limits.ping_timeout_s,
        ws_per_message_deflate=settings.ws_deflate,
        lifespan="off",
        log_level=log_level,
        log_config=None,  # uvicorn's loggers go through ours (text or JSON, see realtime.logs)
        access_log=False,
        timeout_graceful_shutdown=15,
        server_header=False,
        # Client addresses are not used, and not logged unless RT_LOG_CLIENT_IPS=1 (uvicorn
        # logs them on every connection: realtime.redact takes them out of its lines); no
        # proxy-headers middleware per socket.
        proxy_headers=False,
    )
    server = _Server(cfg, node)
    files_mod.check_private(settings.data_dir)
    if settings.log_format == "text":
        print(_banner(host, sock.getsockname()[1], settings), file=sys.stderr, flush=True)
    log.info("open-file limit %d: at most about %d connections", files, max(0, files - 100))
    try:
        await server.serve(sockets=[sock])
    finally:
        await node.stop()


def _nothing_to_back_up(settings: config.Settings, args: argparse.Namespace) -> str | None:
    """Why `export`/`import`/`migrate` must not run (a mistyped directory), before anything is
    made."""
    embedded = not settings.store.mongodb_uri  # (the SQLite file is made by opening it)
    if args.command in ("export", "migrate") and embedded:
        if not SqliteStore(settings.data_dir).path.exists():
            return (
                f"no store in RT_DATA_DIR={settings.data_dir} (nothing to {args.command}: is "
                "RT_DATA_DIR the node's data directory?)"
            )
    if args.command == "import" and not (args.src.is_dir() and any(args.src.iterdir())):
        return f"--from {args.src}: no export there (missing or empty directory)"
    return None


async def _backup(settings: config.Settings, args: argparse.Namespace) -> None:
    """export, import or migrate: opening the store applies its migrations."""
    store = open_store(settings.store)
    try:
        async with asyncio.timeout(settings.store_timeout_s + 1):
            before = await store.schema_version() if args.command == "migrate" else 0
            await store.open()
    except (StoreUnavailable, TimeoutError) as exc:
        await store.close()
        raise StartupError(f"store ({settings.store_kind}) unavailable: {exc}") from None
    try:
        if args.command == "migrate":
            after = await store.schema_version()
            if after == before:
                print(f"{settings.store_kind} store already at schema version {after}")
            else:
                print(
                    f"migrated {settings.store_kind} store from schema version {before} to {after}"
                )
        elif args.command == "export":
            counts = await export_store(store, args.out, store_kind=settings.store_kind)
            summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
            print(f"exported {summary} from {settings.store_kind} to {args.out}")
        else:
            added = await import_store(store, args.src)
            summary = ", ".join(f"{n} {kind}" for kind, n in added.items())
            print(f"imported {summary} (new records) into {settings.store_kind}")
    finally:
        await store.close()


def _fail(message: str) -> int:
    print(f"realtime: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    shown = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="realtime",
        description=__doc__,
        epilog="Everything else is configured by RT_* environment variables (README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server node", formatter_class=shown)
    serve.add_argument(
        "--host",
        default=os.environ.get("RT_HOST") or "127.0.0.1",
        help="address to listen on (or RT_HOST); 0.0.0.0 for every interface",
    )
    serve.add_argument(
        "--port",
        default=os.environ.get("RT_PORT") or "8000",
        help="port to listen on (or RT_PORT)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log lines at this level and above",
    )
    token = sub.add_parser(
        "token", help="print a development token (needs RT_JWT_SECRET)", formatter_class=shown
    )
    token.add_argument("--user", required=True, help="the token's subject (user id)")
    token.add_argument("--roles", default="user", help="comma-separated: user,moderator,responder")
    token.add_argument("--device", default=None, help="the token's device claim")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    export = sub.add_parser(
        "export", help="write every stored record to a directory", formatter_class=shown
    )
    export.add_argument("--out", required=True, type=Path, help="directory to create or fill")
    imp = sub.add_parser(
        "import", help="load an export into the configured store", formatter_class=shown
    )
    imp.add_argument("--from", dest="src", required=True, type=Path, help="an export directory")
    migrate_help = (
        "bring the configured store's schema up to this version, then exit (a node also does "
        "when it starts); refuses an RT_DATA_DIR with no store"
    )
    sub.add_parser("migrate", help=migrate_help, description=migrate_help, formatter_class=shown)
    args = parser.parse_args(argv)

    try:
        settings = config.load(need_token_key=args.command in ("serve", "token"))
    except config.ConfigError as exc:
        return _fail(str(exc))

    if args.command != "token":
        files_mod.make_private()  # everything we write (store, outbox, exports) is ours alone
    if args.command in ("export", "import", "migrate"):
        why = _nothing_to_back_up(settings, args)
        if why is not None:
            return _fail(why)
        try:
            asyncio.run(_backup(settings, args))
        except (StartupError, ImportError_, StoreUnavailable, OSError) as exc:
            return _fail(str(exc))
        return 0

    if args.command == "token":
        roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        if not valid_user_id(args.user) or args.user.startswith("@"):
            return _fail("--user must be 1-128 characters of [A-Za-z0-9_.@-], not starting with @")
        if not roles or not set(roles) <= ROLES:
            return _fail(f"--roles must be a subset of {','.join(sorted(ROLES))}")
        if args.ttl <= 0:
            return _fail("--ttl must be positive")
        try:
            print(issue_token(settings, args.user, roles, ttl_s=args.ttl, device=args.device))
        except ValueError as exc:
            return _fail(str(exc))
        return 0

    logs.configure(args.log_level, settings.log_format, settings.node_id)
    # no client addresses (unless RT_LOG_CLIENT_IPS=1), query strings or tokens in any line
    redact.install(client_ips=settings.log_client_ips)
    try:
        port = int(args.port)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        return _fail(f"--port (or RT_PORT) must be 1-65535, got {args.port!r}")
    try:
        import uvloop

        runner: asyncio.Runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        try:
            runner.run(_serve(settings, args.host, port, args.log_level))
        except StartupError as exc:
            return _fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
