"""Nothing acknowledged is ever lost: crashes, store outages, retention, migration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, Node, SecantusServer, base_env, token, unique_db
from wire import AppDevice, Raw, plain, until


async def _burst(
    url: str,
    channels: list[str],
    per_channel: int,
    stop: asyncio.Event | None = None,
    acked: dict[str, tuple[str, int]] | None = None,
    refused: dict[str, str] | None = None,
) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """Publishers (one per channel) as fast as they can; returns acked cmid -> (channel, seq)
    and refused cmid -> error code (filled in as they come, when passed in, so the caller
    can wait on progress). Connection loss ends a publisher."""
    acked = {} if acked is None else acked
    refused = {} if refused is None else refused

    async def one(i: int, ch: str) -> None:
        try:
            raw = await Raw.open(url, token(f"p{i}"))
        except OSError:
            return
        try:
            for k in range(per_channel):
                if stop is not None and stop.is_set():
                    return
                cmid = f"{i}-{k}"
                reply = await raw.cmd("publish", channel=ch, client_msg_id=cmid, body=plain(cmid))
                if reply["ok"]:
                    acked[cmid] = (ch, reply["seq"])
                else:
                    refused[cmid] = reply["error"]["code"]
                    await asyncio.sleep(0.05)  # a client's back-off before the next attempt
        except Exception:
            return  # the node died under us: what was acked is what counts
        finally:
            await asyncio.gather(raw.close(), return_exceptions=True)

    await asyncio.gather(*(one(i, ch) for i, ch in enumerate(channels)))
    return acked, refused


async def _history(url: str, channel: str) -> list[dict[str, Any]]:
    raw = await Raw.open(url, token("auditor"))
    messages: list[dict[str, Any]] = []
    before = None
    while True:
        args: dict[str, Any] = {"channel": channel, "limit": 200}
        if before is not None:
            args["before_seq"] = before
        page = await raw.ok("history", **args)
        messages = page["messages"] + messages
        if not page["has_more"]:
            break
        before = page["messages"][0]["seq"]
    await raw.close()
    return messages


async def test_sigkill_of_the_embedded_node_loses_nothing_acknowledged(node_factory: Any) -> None:
    node: Node = node_factory("embedded", RT_RATE_PER_S="5000", RT_RATE_BURST="5000")
    channels = [f"public:k{i}" for i in range(4)]
    acked: dict[str, tuple[str, int]] = {}
    task = asyncio.create_task(_burst(node.url, channels, 100_000, acked=acked))
    await until(lambda: len(acked) >= 200, 30, what="the burst to be under way")
    node.kill()  # SIGKILL mid-burst
    await asyncio.wait_for(task, 30)
    node.start()  # same data directory
    for ch in channels:
        stored = {m["client_msg_id"]: m["seq"] for m in await _history(node.url, ch)}
        mine = {cmid: seq for cmid, (c, seq) in acked.items() if c == ch}
        for cmid, seq in mine.items():
            assert stored.get(cmid) == seq, f"acknowledged {cmid} (seq {seq}) was lost"
        assert sorted(stored.values()) == list(range(1, len(stored) + 1))  # gap-free


@pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URI")),
    reason="stops and restarts its own local MongoDB; cannot stop MONGODB_URI",
)
async def test_mongodb_outage_gives_unavailable_and_loses_nothing(
    node_factory: Any, tmp_path: Path
) -> None:
    mongo = SecantusServer(tmp_path / "mongo")
    mongo.start()
    try:
        node: Node = node_factory(
            "onmongo",
            RT_MONGODB_URI=mongo.uri,
            RT_MONGODB_DB=unique_db(),
            RT_STORE_TIMEOUT_S="2",
            RT_RATE_PER_S="5000",
            RT_RATE_BURST="5000",
        )
        channels = [f"public:o{i}" for i in range(4)]
        stop = asyncio.Event()
        acked: dict[str, tuple[str, int]] = {}
        refused: dict[str, str] = {}
        task = asyncio.create_task(_burst(node.url, channels, 100_000, stop, acked, refused))
        await until(lambda: len(acked) >= 40, 30, what="publishes acknowledged before")
        await asyncio.to_thread(mongo.stop)
        # publishes keep coming while the store is down and are refused (each publisher
        # retries after a refusal, so this is not one publisher refused four times)
        await until(lambda: len({c.split("-")[0] for c in refused}) == len(channels), 30)
        ready = await asyncio.to_thread(httpx.get, node.http + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["store"] is False
        await asyncio.to_thread(mongo.start)  # same port, same data

        async def ready_again() -> bool:
            r = await asyncio.to_thread(httpx.get, node.http + "/readyz", timeout=10)
            return r.status_code == 200

        await until(ready_again, 30, what="the node to reconnect by itself")
        after_restart = len(acked)
        await until(lambda: len(acked) >= after_restart + 40, 30, what="publishes acked again")
        stop.set()
        await asyncio.wait_for(task, 60)
        assert set(refused.values()) == {"unavailable"}
        for ch in channels:
            stored = {m["client_msg_id"]: m["seq"] for m in await _history(node.url, ch)}
            for cmid, (c, seq) in acked.items():
                if c == ch:
                    assert stored.get(cmid) == seq, f"acknowledged {cmid} was lost"
            assert sorted(stored.values()) == list(range(1, len(stored) + 1))
        # A refused publish means "retry with the same client_msg_id": the retry stores it
        # exactly once (or finds the copy a write that failed mid-flight left behind).
        retry = await Raw.open(node.url, token("p0"))
        for cmid, _code in list(refused.items())[:20]:
            if cmid.startswith("0-"):
                await retry.ok("publish", channel=channels[0], client_msg_id=cmid, body=plain(cmid))
        await retry.close()
        after = [m["client_msg_id"] for m in await _history(node.url, channels[0])]
        assert len(after) == len(set(after))  # nothing doubled
    finally:
        mongo.stop()


async def test_retention_deletes_old_messages_but_never_reuses_seqs(node_factory: Any) -> None:
    node: Node = node_factory(
        "retention", RT_RETENTION="public=0.00001d,room=forever", RT_RETENTION_INTERVAL_S="0.3"
    )
    raw = await Raw.open(node.url, token("alice"))
    node.add_member("room:long", "alice")
    device = AppDevice("alice-phone")
    await device.register(raw, "alice")
    await raw.ok(  # older than the public messages below: kept only by the room rule
        "publish",
        channel="room:long",
        client_msg_id="keep",
        body=device.envelope("room:long", "keep"),
    )
    for i in range(3):
        await raw.ok("publish", channel="public:short", client_msg_id=f"r{i}", body=plain("x"))

    async def purged() -> bool:
        return (await raw.ok("history", channel="public:short"))["messages"] == []

    await until(purged, 10, what="retention (0.86 s, checked every 0.3 s)")
    assert len((await raw.ok("history", channel="room:long"))["messages"]) == 1
    assert (await raw.ok("publish", channel="public:short", client_msg_id="r9", body=plain("y")))[
        "seq"
    ] == 4
    await raw.close()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "realtime_safety.realtime", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_a_single_node_moves_to_mongodb_with_export_and_import(
    node_factory: Any, tmp_path: Path, mongo_uri: str
) -> None:
    single: Node = node_factory("before")
    raw = await Raw.open(single.url, token("alice"))
    room = f"room:{uuid.uuid4().hex[:6]}"
    single.add_member(room, "alice")
    device = AppDevice("alice-laptop")
    await device.register(raw, "alice")
    bodies = [device.envelope(room, f"m{i}") for i in range(6)]
    for i in range(5):
        await raw.ok("publish", channel=room, client_msg_id=f"m{i}", body=bodies[i])
    await raw.ok("read", channel=room, seq=3)
    await raw.close()
    single.stop()

    out = tmp_path / "backup"
    sqlite_env = single.env
    exported = _cli(sqlite_env, "export", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("exported 5 messages")
    assert '"$binary"' in (out / "messages.jsonl").read_text()  # mongoimport-compatible

    db = unique_db()
    mongo_env = base_env(tmp_path / "after", RT_MONGODB_URI=mongo_uri, RT_MONGODB_DB=db)
    mongo_env.pop("RT_JWT_SECRET")  # import verifies no tokens
    for _ in range(2):  # idempotent
        imported = _cli(mongo_env, "import", "--from", str(out))
        assert imported.returncode == 0, imported.stderr
    assert "imported 0 messages" in imported.stdout
    bad = _cli(mongo_env, "import", "--from", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("realtime: error:")

    moved: Node = node_factory("after", RT_MONGODB_URI=mongo_uri, RT_MONGODB_DB=db)
    raw = await Raw.open(moved.url, token("alice"))
    history = await raw.ok("history", channel=room)
    assert [m["client_msg_id"] for m in history["messages"]] == [f"m{i}" for i in range(5)]
    assert history["messages"][0]["body"]["ct"] == bodies[0]["ct"] and history["read_seq"] == 3
    # the device came along too: its next signed message verifies on the new store
    assert (await raw.ok("publish", channel=room, client_msg_id="m5", body=bodies[5]))["seq"] == 6
    assert (await raw.ok("publish", channel=room, client_msg_id="m1", body=bodies[1]))[
        "duplicate"
    ] is True
    await raw.close()
