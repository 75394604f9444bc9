"""Gaps found by mutation testing (scripts/mutate alerts): behaviour no other test pinned down.
Real server processes; the real firebase-admin SDK talks to a local fake FCM that records
every request."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Node, base_env, token
from wire import Raw, until

from loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.5200, "lon": 13.4050}


@pytest.fixture
def fakes() -> Iterator[FakeProviders]:
    f = FakeProviders()
    yield f
    f.close()


@pytest.fixture
def alert_node(tmp_path: Path, fakes: FakeProviders) -> Iterator[Node]:
    node = Node(
        base_env(tmp_path / "n", RT_ALERT_RETRY_BASE_S="0.05", **fakes.env(tmp_path)), "alerts"
    )
    node.start()
    yield node
    node.stop()


async def test_the_alert_push_carries_where_and_who(alert_node: Node, fakes: FakeProviders) -> None:
    """The FCM data of an alert is what a locked phone shows without opening the app: the
    place (lat/lon as strings: FCM data values are strings), the kind, the owner, the state
    and the escalation count (mutant: alerts/delivery.py, the `data.update(lat=…, lon=…)`
    line removed)."""
    owner, carl = f"olga-{uuid.uuid4().hex[:5]}", f"carl-{uuid.uuid4().hex[:5]}"
    r = alert_node.api(
        "PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"tier": 1, "user": carl}]}
    )
    assert r.status_code == 200, r.text
    r = alert_node.api("PUT", f"/v1/users/{carl}/push-tokens/tok-{carl}", json={"platform": "ios"})
    assert r.status_code == 201, r.text
    olga = await Raw.open(alert_node.url, token(owner))
    reply = await olga.ok("alert.trigger", kind="medical", location=HERE, client_alert_id="a-1")

    await until(lambda: fakes.fcm_to(f"tok-{carl}"))
    data = fakes.fcm_to(f"tok-{carl}")[0]["data"]
    assert data["type"] == "alert" and data["alert_id"] == reply["alert_id"]
    assert (data["kind"], data["user"], data["state"]) == ("medical", owner, "active")
    assert data["escalation"] == "0"
    assert float(data["lat"]) == HERE["lat"] and float(data["lon"]) == HERE["lon"]
    await olga.close()


@pytest.mark.parametrize("ts", ["1700000000000", 1.5, None, [1]])
async def test_a_location_timestamp_must_be_integer_milliseconds(
    alert_node: Node, ts: object
) -> None:
    """A location's `ts` that is not an integer is refused as bad_request, not accepted nor an
    internal error (mutant: alerts/model.py, `isinstance(ts, bool) or not isinstance(ts, int)`
    with `and`)."""
    olga = await Raw.open(alert_node.url, token(f"olga-{uuid.uuid4().hex[:5]}"))
    location = {**HERE, "ts": ts}
    assert await olga.error("alert.trigger", kind="sos", location=location) == "bad_request"
    assert (await olga.ok("ping"))["ts"] > 0  # and the connection stays
    await olga.close()
