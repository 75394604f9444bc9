"""Configuration and the CLI: every bad configuration is one line on stderr, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import SECRET, Node, base_env, free_port
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from realtime_safety.protocol import ProtocolError
from realtime_safety.realtime import cli, config
from realtime_safety.realtime.auth import TokenVerifier


def run_cli(
    tmp_path: Path, *args: str, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    full = base_env(tmp_path, **env)
    for key in [k for k, v in env.items() if v == ""]:
        full.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "realtime_safety.realtime", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"RT_JWT_SECRET": ""}, "no token key"),
        ({"RT_JWT_SECRET": "short"}, "at least 32"),
        ({"RT_JWT_ALGORITHMS": "none"}, "cannot be used"),
        ({"RT_JWT_ALGORITHMS": "RS256"}, "cannot be used with RT_JWT_SECRET"),
        ({"RT_REDIS_URL": "redis://127.0.0.1:1"}, "RT_MONGODB_URI is not"),
        ({"RT_REDIS_URL": "http://x"}, "must start with redis://"),
        ({"RT_MONGODB_URI": "postgres://x"}, "must start with mongodb://"),
        ({"RT_RATE_PER_S": "fast"}, "RT_RATE_PER_S must be a number"),
        ({"RT_SEND_QUEUE_FRAMES": "-3"}, "must be positive"),
        ({"RT_MAX_BODY_BYTES": "999999999"}, "smaller than RT_MAX_FRAME_BYTES"),
        ({"RT_NODE_ID": "has space"}, "RT_NODE_ID"),
        ({"RT_API_KEY": "tiny"}, "RT_API_KEY must be at least 16"),
        ({"RT_JWT_SECRET_FILE": "/nonexistent/secret"}, "cannot read"),
        ({"RT_ALERT_FALLBACK_S": "0"}, "RT_ALERT_FALLBACK_S must be seconds"),
        ({"RT_ALERT_FALLBACK_S": "30,0:5"}, "tier:seconds"),
        ({"RT_ALERT_FALLBACK_S": "30,2:-1"}, "tier:seconds"),
    ],
)
def test_bad_configuration_is_one_line(
    tmp_path: Path,
    env: dict[str, str],
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In this process, through the CLI's own entry point (what `python -m
    realtime_safety.realtime serve` runs), with nothing but the case's environment; the
    process itself: test_a_bad_configuration_stops_the_process_with_one_line."""
    if "RT_JWT_SECRET_FILE" in env:
        env = {**env, "RT_JWT_SECRET": ""}
    full = base_env(tmp_path, **env)
    for key in list(os.environ):
        if key.startswith("RT_"):
            monkeypatch.delenv(key)
    for key, value in full.items():
        if key.startswith("RT_") and value != "":
            monkeypatch.setenv(key, value)
    # --port 0: were the configuration accepted, the command would stop at the port, with
    # another message, instead of serving.
    assert cli.main(["serve", "--port", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("realtime: error:"), lines
    assert fragment in lines[0]


def test_a_bad_configuration_stops_the_process_with_one_line(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve", "--port", str(free_port()), RT_JWT_SECRET="short")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("realtime: error:"), result.stderr
    assert "at least 32" in lines[0]


def test_unreachable_backends_are_one_line(tmp_path: Path) -> None:
    dead = free_port()
    result = run_cli(
        tmp_path,
        "serve",
        "--port",
        str(free_port()),
        RT_REDIS_URL=f"redis://127.0.0.1:{dead}",
        RT_MONGODB_URI=f"mongodb://127.0.0.1:{dead}/?directConnection=true",
        RT_STORE_TIMEOUT_S="0.5",
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("realtime: error: store (mongodb) unavailable")
    assert "Traceback" not in result.stderr


def test_redis_down_is_one_line(tmp_path: Path, mongo_uri: str) -> None:
    result = run_cli(
        tmp_path,
        "serve",
        "--port",
        str(free_port()),
        RT_REDIS_URL=f"redis://127.0.0.1:{free_port()}",
        RT_MONGODB_URI=mongo_uri,
        RT_STORE_TIMEOUT_S="2",
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("realtime: error: broker unavailable")


def test_token_command(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path,
        "token",
        "--user",
        "alice",
        "--roles",
        "user,moderator",
        "--device",
        "phone",
        "--ttl",
        "60",
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["roles"] == ["user", "moderator"]
    assert claims["device"] == "phone" and 50 < claims["exp"] - time.time() <= 60
    bad = run_cli(tmp_path, "token", "--user", "alice", "--roles", "admin")
    assert bad.returncode == 2 and "--roles" in bad.stderr


def test_public_key_tokens_with_explicit_algorithms(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(pem)
    settings = config.load(
        {
            "RT_JWT_PUBLIC_KEY_FILE": str(key_file),
            "RT_JWT_ALGORITHMS": "EdDSA",
            "RT_FRANKING_KEY": "f" * 32,
        }
    )
    verifier = TokenVerifier(settings)
    good = jwt.encode({"sub": "alice", "exp": time.time() + 60}, private, algorithm="EdDSA")
    assert verifier.verify(good).user == "alice"
    # HS256 signed with the public key's text (algorithm confusion) must fail.
    forged = jwt.encode({"sub": "alice", "exp": time.time() + 60}, "k" * 40, algorithm="HS256")
    with pytest.raises(ProtocolError):
        verifier.verify(forged)
    with pytest.raises(config.ConfigError):
        config.load({"RT_JWT_PUBLIC_KEY": pem.decode(), "RT_JWT_ALGORITHMS": "HS256"})
    with pytest.raises(config.ConfigError, match="RT_FRANKING_KEY"):
        config.load({"RT_JWT_PUBLIC_KEY": pem.decode()})


def test_defaults_are_embedded() -> None:
    settings = config.load({"RT_JWT_SECRET": SECRET})
    assert settings.broker_kind == "in-process" and settings.store_kind == "sqlite"
    assert settings.limits.max_frame_bytes == 128 * 1024
    assert settings.limits.auth_timeout_s == 10 and settings.limits.recovery_limit == 1000
    assert settings.plaintext_namespaces == frozenset({"public"})


def test_docker_compose_file_is_valid() -> None:
    import shutil

    root = Path(__file__).resolve().parent.parent
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {"RT_JWT_SECRET": "x" * 32, "RT_API_KEY": "y" * 16, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [exe, "config", "-q"], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(tmp_path, "serve", "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"realtime: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


# --- a new user's first run (issue 22) --------------------------------------------------------


def test_serve_says_where_it_is_and_its_root_page_links_the_rest(tmp_path: Path) -> None:
    """From outside a checkout (the data files must come with the package), on RT_PORT."""
    import httpx

    port = free_port()
    env = base_env(tmp_path / "data", RT_PORT=str(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "realtime_safety.realtime", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while not any("health" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen.append(proc.stderr.readline())
        banner = "".join(seen)
        for part in (f"ws://127.0.0.1:{port}/ws", f"http://127.0.0.1:{port}/console",
                     f"http://127.0.0.1:{port}/openapi.json", "realtime token --user"):  # fmt: skip
            assert part in banner, banner
        root = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert root.status_code == 200 and root.headers["content-type"].startswith("text/html")
        for link in ('href="/console"', 'href="/openapi.json"', 'href="/readyz"'):
            assert link in root.text
        for path in ("/console", "/openapi.json"):
            assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_favicon_is_the_consoles_icon(node_factory: Any) -> None:
    """A browser asks for /favicon.ico on what has no page of ours around it (/openapi.json,
    /healthz): it gets the icon the console has inline, long cached, instead of a 404."""
    import re
    from urllib.parse import unquote

    import httpx

    node: Node = node_factory("icon")
    icon = httpx.get(f"{node.http}/favicon.ico", timeout=10)
    assert icon.status_code == 200, icon.text
    assert icon.headers["content-type"] == "image/svg+xml"
    cache = re.fullmatch(r"public, max-age=(\d+)", icon.headers["cache-control"])
    assert cache is not None and int(cache[1]) >= 7 * 86400, icon.headers
    assert icon.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(f"{node.http}/console", timeout=10).text
    inline = re.search(r'<link rel="icon" href="data:image/svg\+xml,([^"]+)">', page)
    assert inline is not None and unquote(inline[1]).encode() == icon.content
    assert httpx.head(f"{node.http}/favicon.ico", timeout=10).status_code == 200


def test_help_shows_every_default_and_a_bad_port_is_one_line(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "serve", "--help").stdout
    assert "(default: 127.0.0.1)" in out and "(default: 8000)" in out and "RT_PORT" in out
    bad = run_cli(tmp_path, "serve", RT_PORT="eighty")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "realtime: error: --port (or RT_PORT) must be 1-65535, got 'eighty'"
    ]


def test_export_and_import_refuse_a_directory_with_nothing_in_it(tmp_path: Path) -> None:
    typo = tmp_path / "dta"
    export = run_cli(tmp_path, "export", "--out", str(tmp_path / "out"), RT_DATA_DIR=str(typo))
    assert export.returncode == 2 and "no store in RT_DATA_DIR" in export.stderr
    assert not typo.exists() and not (tmp_path / "out").exists()  # nothing made
    (tmp_path / "empty").mkdir()
    for src in ("missing", "empty"):
        imp = run_cli(tmp_path, "import", "--from", str(tmp_path / src))
        assert imp.returncode == 2 and "no export there" in imp.stderr, imp.stderr


def test_migrate_brings_an_old_sqlite_store_up_to_date_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`realtime migrate` through the CLI's entry point, in this process, on a store made by
    an older server (the schema from before alerts moved to their own file, as
    tests/test_storage.py makes it): it says which versions it went between, the file is at
    the current version afterwards, and a second run changes nothing and says so."""
    import sqlite3

    from realtime_safety.storage.sqlite import DOCS_MOVED, MIGRATIONS, SCHEMA_VERSION

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    old = DOCS_MOVED - 1
    db = sqlite3.connect(data / "realtime.sqlite3", isolation_level=None)
    for version, script in enumerate(MIGRATIONS[:old], start=1):
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
        db.execute(f"PRAGMA user_version={version}")
    db.close()
    for key in list(os.environ):
        if key.startswith("RT_"):
            monkeypatch.delenv(key)
    for key, value in base_env(data).items():
        if key.startswith("RT_"):
            monkeypatch.setenv(key, value)
    umask = os.umask(0o022)  # the command makes this process's umask 077: put it back after
    os.umask(umask)
    try:
        assert cli.main(["migrate"]) == 0
        first = capsys.readouterr()
        assert cli.main(["migrate"]) == 0
        second = capsys.readouterr()
    finally:
        os.umask(umask)
    assert first.err == "" and second.err == ""
    assert first.out == f"migrated sqlite store from schema version {old} to {SCHEMA_VERSION}\n"
    assert second.out == f"sqlite store already at schema version {SCHEMA_VERSION}\n"
    db = sqlite3.connect(data / "realtime.sqlite3")
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert SCHEMA_VERSION > old
    finally:
        db.close()
