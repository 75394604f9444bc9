"""The real-time server: WebSocket protocol v1 (docs/protocol.md), the node, the CLI. The
wire vocabulary it speaks with every feature package is the ground-floor package `protocol`.

Offers:
- `realtime.cli` — `realtime serve` and `realtime token`;
- `realtime.config` — settings from the environment (`load`, `Settings`, `ConfigError`);
- `realtime.auth` — JWT verification with explicit algorithms (the `Identity` it gives is in
  `protocol`);
- `realtime.metrics`, `realtime.logs` — Prometheus metrics and log lines (text or JSON);
- `realtime.server` — the ASGI app (`create_app`): `/ws`, the server API, health, metrics;
- `realtime.node` — a node: assembles the features (each feature package's `ops`: channels,
  presence, crypto, alerts, moderation) into one op table, and keeps the open sessions;
- `realtime.connection` — one socket, the `protocol.Session` the ops see: auth and refresh,
  the command loop and its dispatch, rate limits, the bounded outgoing queue;
- `realtime.websocket` — the uvicorn WebSocket protocol the node runs on (direct frame
  writes for fan-out, small per-connection footprint).

Nothing below imports this package: the features are written against `protocol.Session`.
The Python client library is the package `client`.
"""

__version__ = "0.1.0"
