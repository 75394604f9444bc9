"""The real-time server: WebSocket protocol v1 (`../shared/PROTOCOL.md`), the node, the CLI.

Offers:
- `realtime.cli` — `realtime serve` and `realtime token`;
- `realtime.config` — settings from the environment (`load`, `Settings`, `ConfigError`);
- `realtime.protocol` — codecs (`rt.v1.json`, `rt.v1.msgpack`), error and close codes,
  `wire_frame` (a payload as a complete server frame);
- `realtime.auth` — JWT verification with explicit algorithms;
- `realtime.server` — the ASGI app (`create_app`): `/ws`, the server API, health, metrics;
- `realtime.node` — a node: store, broker, hub, access control, connections;
- `realtime.connection` — one socket: auth, commands, bounded outgoing queue, rate limits;
- `realtime.websocket` — the uvicorn WebSocket protocol the node runs on (direct frame
  writes for fan-out, small per-connection footprint);
- `realtime.client` — the Python client library (reconnects and resumes with `since_seq`).
"""

__version__ = "0.1.0"
