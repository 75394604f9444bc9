"""Log lines as text (the default) or one JSON object per line (`RT_LOG_FORMAT=json`). Every
line logged from within a client connection carries its id (`conn`, the connection's session
id), so one client's story can be followed across a node's log; every JSON line carries the
node id. Nothing here logs message bodies, tokens, locations or phone numbers: that is the
callers' rule, this only shapes the lines."""

from __future__ import annotations

import datetime
import json
import logging
from contextvars import ContextVar

# Set by a connection's task; tasks it starts inherit it.
CONNECTION: ContextVar[str | None] = ContextVar("rt_connection", default=None)

TEXT = "%(asctime)s %(levelname)s %(name)s%(conn_tag)s: %(message)s"


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        conn = CONNECTION.get()
        record.conn = conn
        record.conn_tag = f" [{conn}]" if conn else ""
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self._node = node_id

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "node": self._node,
        }
        conn = getattr(record, "conn", None)
        if conn:
            line["conn"] = conn
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, fmt: str, node_id: str) -> None:
    """The root logger (uvicorn's loggers propagate to it): `fmt` "text" or "json"."""
    handler = logging.StreamHandler()
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter(node_id) if fmt == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
