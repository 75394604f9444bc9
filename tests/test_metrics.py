"""`/metrics` of a real node: the Prometheus text format (checked by `promtool check metrics`
from Debian's prometheus package, and by prometheus_client's parser), HELP and TYPE on every
family, and the histograms an operator needs filled by real traffic."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import Node, base_env, token
from prometheus_client.parser import text_string_to_metric_families
from wire import Raw, plain

from realtime_safety.loadtests.fakeproviders import FakeProviders

HERE = {"lat": 52.52, "lon": 13.405}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_show_latencies_and_alert_outcomes(
    tmp_path: Path, fakes: FakeProviders
) -> None:
    node = Node(base_env(tmp_path / "m", **fakes.env(tmp_path)), "metrics").start()
    try:
        phone = "+15550404"
        owner = f"mo-{uuid.uuid4().hex[:5]}"
        node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": phone}]})
        sub = await Raw.open(node.url, token("sue"))
        pub = await Raw.open(node.url, token(owner))
        await sub.ok("subscribe", channel="public:metrics")
        await pub.ok("publish", channel="public:metrics", client_msg_id="m1", body=plain("hi"))
        assert (await sub.push())["seq"] == 1
        await pub.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="a1")
        await pub.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="a1")  # retry

        async def scrape() -> str:
            r = await asyncio.to_thread(httpx.get, node.http + "/metrics", timeout=10)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            return r.text

        deadline = asyncio.get_running_loop().time() + 10
        while True:  # the SMS goes out in the background
            text = await scrape()
            found = samples(text)
            if found.get(("rt_alert_deliveries_total", (("outcome", "sent"), ("route", "sms")))):
                break
            assert asyncio.get_running_loop().time() < deadline, "no SMS delivery counted"
            await asyncio.sleep(0.1)
        assert found[("rt_publish_seconds_count", ())] == 1
        assert found[("rt_backend_call_seconds_count", (("call", "publish"),))] >= 1
        assert found[("rt_fanout_seconds_count", ())] >= 1
        assert found[("rt_delivery_lag_seconds_count", ())] >= 1
        assert found[("rt_alert_triggers_total", (("result", "created"),))] == 1
        assert found[("rt_alert_triggers_total", (("result", "retried"),))] == 1
        assert found[("rt_alert_trigger_to_provider_seconds_count", (("route", "sms"),))] == 1
        assert found[("rt_alert_provider_call_seconds_count", (("route", "sms"),))] == 1
        assert found[("rt_connections", ())] == 2
        assert found[("rt_frames_in_total", ())] >= 5
        assert found[("process_resident_memory_bytes", ())] > 0
        families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
        helps = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
        assert families and set(families) <= helps  # HELP on every family
        # Every series the Grafana dashboard (deploy/) queries is one this node exports.
        dashboard = (Path(__file__).parent.parent / "deploy/grafana-dashboard.json").read_text()
        queried = set(re.findall(r"\b((?:rt|process)_[a-z_]+)", dashboard))
        exported = {name for name, _ in found}
        assert queried and queried <= exported, queried - exported
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.fail("promtool is not installed (scripts/test installs Debian's prometheus)")
        check = await asyncio.to_thread(
            subprocess.run,
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        await sub.close()
        await pub.close()
    finally:
        node.stop()


async def test_json_logs_carry_the_node_and_the_connection(tmp_path: Path) -> None:
    node = Node(base_env(tmp_path / "j", RT_LOG_FORMAT="json", RT_NODE_ID="node-j"), "json")
    node.start()
    try:
        lonely = await Raw.open(node.url, token("lonely"))  # no contacts, no responders
        await lonely.ok("alert.trigger", kind="sos", location=HERE, client_alert_id="x")
        await lonely.ok("ping")  # the warning is logged before the trigger's reply
        await lonely.close()
    finally:
        node.stop()
    lines = [json.loads(line) for line in node.log().splitlines() if line.strip()]
    assert lines and all(line["node"] == "node-j" and line["level"] for line in lines)
    warning = next(line for line in lines if "no recipients" in line["msg"])
    assert warning["level"] == "WARNING" and warning["logger"] == "realtime.alerts"
    assert len(warning["conn"]) >= 16  # the connection that triggered it


def test_an_unknown_log_format_is_refused(tmp_path: Path) -> None:
    node = Node(base_env(tmp_path / "x", RT_LOG_FORMAT="xml"), "xml")
    with pytest.raises(RuntimeError, match="RT_LOG_FORMAT must be text or json"):
        node.start()
