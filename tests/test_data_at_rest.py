"""Issue 23, part B: data at rest is the server account's alone.

A real node writes its store (SQLite and its -wal/-shm files) and the development outbox (an
SOS's phone number) into RT_DATA_DIR, and `realtime export` writes a backup; then another
local account (`nobody`, when the suite runs as root) tries to read them, beside a control
file it can read, so the refusal is the files' doing. The node runs with the permissive umask
022, so modes come from the server, not from the test. A data directory left open by an older
version is reported at start-up.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Node, base_env, token
from wire import Raw, plain, until

from realtime_safety.alerts.providers import OutboxSms
from realtime_safety.storage.backup import export_store
from realtime_safety.storage.sqlite import SqliteStore

NOBODY = 65534
HERE = {"lat": 52.52, "lon": 13.405, "accuracy_m": 12.0}
WARNING = "data at rest readable by other local accounts"


class ServerMadeNode(Node):
    """A `Node` whose RT_DATA_DIR the server itself creates (the harness's `Node` makes it
    first, for its log file, which here lives outside)."""

    makes_data_dir = False


def node_in(open_dir: Path) -> Node:
    node = ServerMadeNode(base_env(open_dir / "data"), "n")
    node.log_path = open_dir / "n.log"  # the test's own file, outside the data directory
    return node


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every account may enter (pytest's own tmp directories are 0700, which
    would hide what is inside from other accounts whatever its modes)."""
    path = Path(tempfile.mkdtemp(prefix="rt-at-rest-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Processes started by the test get the usual permissive umask."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def other_account_reads(path: Path) -> bool:
    """Whether the `nobody` account can read `path` (only checkable as root)."""
    result = subprocess.run(["cat", str(path)], user=NOBODY, capture_output=True, check=False)
    return result.returncode == 0


def private_modes(top: Path) -> dict[str, str]:
    """Every path under `top` (itself included) whose mode lets group or others in."""
    found = {}
    for path in [top, *top.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found[str(path)] = f"{mode:04o}"
    return found


async def test_the_store_outbox_and_exports_are_readable_by_the_server_account_only(
    open_dir: Path, umask_022: None
) -> None:
    data = open_dir / "data"
    node = node_in(open_dir).start()
    phone = "+15557000042"
    try:
        owner = f"otto-{uuid.uuid4().hex[:5]}"
        r = node.api("PUT", f"/v1/users/{owner}/contacts", json={"contacts": [{"phone": phone}]})
        assert r.status_code == 200, r.text
        otto = await Raw.open(node.url, token(owner))
        await otto.ok("publish", channel="public:square", client_msg_id="m1", body=plain("hi"))
        await otto.ok("alert.trigger", kind="fire", location=HERE, client_alert_id="a1")
        outbox = data / "outbox.jsonl"

        def outbox_has_the_sms() -> bool:
            return outbox.exists() and phone in outbox.read_text()

        await until(outbox_has_the_sms, 20, what="the SOS's SMS in the outbox")
        written = {p.name for p in data.iterdir()}
        assert {"realtime.sqlite3", "realtime.sqlite3-wal", "realtime.sqlite3-shm"} <= written
        assert private_modes(data) == {}
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert WARNING not in node.log()  # nothing to report on a fresh directory
        # whatever else the process (or a library in it) creates is private too
        assert node.proc is not None
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        assert "Umask:\t0077" in status, status
        await otto.close()
    finally:
        node.stop()

    export = open_dir / "backup"
    done = subprocess.run(  # noqa: ASYNC221 - the node is stopped, nothing else runs
        [sys.executable, "-m", "realtime_safety.realtime", "export", "--out", str(export)],
        env=node.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert phone in (export / "docs.jsonl").read_text()  # the backup holds the contacts
    assert private_modes(export) == {}

    if os.geteuid() != 0:
        pytest.skip("modes checked; reading as another account needs root")
    control = open_dir / "control.txt"
    control.write_text(phone)
    control.chmod(0o644)
    assert other_account_reads(control)  # the account can read what is open to it
    for path in (outbox, data / "realtime.sqlite3", export / "docs.jsonl"):
        assert not other_account_reads(path), path


async def test_a_data_directory_open_to_others_is_reported_at_start_up(
    open_dir: Path, umask_022: None
) -> None:
    data = open_dir / "data"
    node = node_in(open_dir).start()
    node.stop()
    assert WARNING not in node.log()  # control: a private directory is not reported
    # as an older version (or a careless hand) left it
    data.chmod(0o755)
    (data / "realtime.sqlite3").chmod(0o644)
    node.start()
    try:

        def reported() -> bool:
            return WARNING in node.log()

        await until(reported, 10, what="the start-up warning")
        line = next(ln for ln in node.log().splitlines() if WARNING in ln)
        assert "WARNING" in line
        assert f"{data} (0755)" in line and f"{data / 'realtime.sqlite3'} (0644)" in line
    finally:
        node.stop()


async def test_the_store_outbox_and_export_ask_for_private_modes_themselves(
    open_dir: Path, umask_022: None
) -> None:
    """The same rule when the code runs in another process (here: the test's, umask 022)."""
    data = open_dir / "lib"
    store = SqliteStore(data)
    await store.open()
    try:
        await store.docs.put("contacts", "otto", {"contacts": [{"phone": "+15557000043"}]})
        await OutboxSms(data / "outbox.jsonl").send("+15557000043", "SOS", None)
        await export_store(store, open_dir / "lib-backup", store_kind="sqlite")
    finally:
        await store.close()
    assert {p.name for p in data.iterdir()} >= {"realtime.sqlite3", "outbox.jsonl"}
    assert private_modes(data) == {}
    assert private_modes(open_dir / "lib-backup") == {}
    control = open_dir / "control.txt"  # what the same process makes without asking
    control.write_text("x")
    assert private_modes(control) != {}
