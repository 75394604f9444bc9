"""Alert values and their validation (docs/protocol-v1.md section 7)."""

from __future__ import annotations

import math
import time
from typing import Any, Final

from realtime_safety.protocol import ProtocolError

KINDS: Final = frozenset({"sos", "medical", "fire", "harassment", "other"})
OUTCOMES: Final = frozenset({"safe", "false_alarm", "handled"})
MAX_NOTE: Final = 500
EARTH_RADIUS_M: Final = 6_371_008.8


def now_ms() -> int:
    return int(time.time() * 1000)


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError("bad_request", f"location.{name} must be a finite number")
    return float(value)


def parse_location(raw: object) -> dict[str, Any]:
    """{lat, lon, accuracy_m?, ts?}: lat in [-90, 90], lon in [-180, 180], accuracy 0-100 km,
    ts (ms) not in the future (1 min of clock skew allowed) nor older than a day."""
    if not isinstance(raw, dict):
        raise ProtocolError("bad_request", "'location' must be {lat, lon, accuracy_m?, ts?}")
    lat, lon = _number(raw.get("lat"), "lat"), _number(raw.get("lon"), "lon")
    if not -90 <= lat <= 90:
        raise ProtocolError("bad_request", "location.lat must be in [-90, 90]")
    if not -180 <= lon <= 180:
        raise ProtocolError("bad_request", "location.lon must be in [-180, 180]")
    location: dict[str, Any] = {"lat": lat, "lon": lon}
    if raw.get("accuracy_m") is not None:
        accuracy = _number(raw["accuracy_m"], "accuracy_m")
        if not 0 <= accuracy <= 100_000:
            raise ProtocolError("bad_request", "location.accuracy_m must be in [0, 100000]")
        location["accuracy_m"] = accuracy
    now = now_ms()
    ts = raw.get("ts", now)
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise ProtocolError("bad_request", "location.ts must be milliseconds since the epoch")
    if ts > now + 60_000 or ts < now - 86_400_000:
        raise ProtocolError("bad_request", "location.ts must be within the last day")
    location["ts"] = ts
    return location


def distance_m(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Great-circle distance (haversine)."""
    la1, lo1, la2, lo2 = map(math.radians, (a["lat"], a["lon"], b["lat"], b["lon"]))
    h = (
        math.sin((la2 - la1) / 2) ** 2
        + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))
