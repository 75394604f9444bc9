"""The real-time server: WebSocket protocol v1 (docs/protocol.md), the node, the CLI. The
wire vocabulary it speaks with every feature package is the ground-floor package `protocol`.

Offers:
- `realtime.cli` — `realtime serve` and `realtime token`;
- `realtime.config` — settings from the environment (`load`, `Settings`, `ConfigError`);
- `realtime.auth` — JWT verification with explicit algorithms (the `Identity` it gives is in
  `protocol`);
- `realtime.metrics`, `realtime.logs` — Prometheus metrics and log lines (text or JSON);
- `realtime.server` — the ASGI app (`create_app`): `/ws`, the server API, health, metrics;
- `realtime.node` — a node: store, broker, hub, access control, connections;
- `realtime.connection` — one socket: auth, commands, bounded outgoing queue, rate limits;
- `realtime.websocket` — the uvicorn WebSocket protocol the node runs on (direct frame
  writes for fan-out, small per-connection footprint);
- `realtime.client` — the Python client library (reconnects and resumes with `since_seq`).
"""

__version__ = "0.1.0"
