"""Real parts for the tests: redis-server processes, MongoDB, and server node processes.

MongoDB (docs/mongodb.md): a real server when MONGODB_URI is set, otherwise a
SecantusDB process (wire-compatible, WiredTiger) on a free loopback port; always through
pymongo's real driver. Every test that needs MongoDB gets its own database name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from realtime_safety.loadtests.fakeproviders import FakeProviders
from realtime_safety.loadtests.support import redis_command

SECRET = "test-secret-" + "x" * 40
API_KEY = "test-api-key-0123456789"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on `port` (Linux /proc), or None where /proc cannot tell."""
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
    except (OSError, IndexError, ValueError):
        return None
    return inodes


def _listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a socket listening on `port` (None: cannot tell)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def wait_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something listens on `port`; with `proc`, until that process does. (Ports
    come from free_port() and are reused on restarts: while one was free, another test's
    server, in this or another worker, may have taken it, and must not pass for ours.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            if proc is None or _listens(proc.pid, port) is not False:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{'our process does not listen' if proc else 'nothing listens'} on {port}")


def token(user: str, roles: list[str] | None = None, ttl: float = 3600, **claims: object) -> str:
    now = time.time()
    payload = {"sub": user, "roles": roles or ["user"], "iat": int(now), "exp": now + ttl, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


# --- Redis -------------------------------------------------------------------------------


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (.ci/run installs it with apt-get)")
        self.proc = subprocess.Popen(
            redis_command(self.port, str(self.dir)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[type[RedisServer]]:
    servers: list[RedisServer] = []

    class Factory(RedisServer):
        def __init__(self) -> None:
            super().__init__(tmp_path)
            servers.append(self)

    yield Factory
    for s in servers:
        s.stop()


@pytest.fixture
def redis_server(redis_factory: type[RedisServer]) -> RedisServer:
    server = redis_factory()
    server.start()
    return server


# --- MongoDB -----------------------------------------------------------------------------


class SecantusServer:
    """A local wire-compatible MongoDB (SecantusDB) that a test can stop and start again."""

    def __init__(self, storage: Path) -> None:
        self.port = free_port()
        self.storage = storage
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> None:
        exe = shutil.which("secantusd-py") or str(Path(sys.executable).parent / "secantusd-py")
        if not Path(exe).exists():
            pytest.fail(
                "secantusd-py is not installed (pip install -e '.[test]') and no MONGODB_URI"
            )
        self.storage.mkdir(parents=True, exist_ok=True)
        log = open(self.storage / "secantusd.log", "ab")
        self.proc = subprocess.Popen(
            [
                exe,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--storage-path",
                str(self.storage / "db"),
                "--standalone",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.port, timeout=60, proc=self.proc)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), which keeps acknowledged data."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    uri = os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    server = SecantusServer(tmp_path_factory.mktemp("secantus"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


def unique_db() -> str:
    return "rt_test_" + uuid.uuid4().hex[:12]


# --- server nodes ------------------------------------------------------------------------


class Node:
    """A real `realtime serve` process (`module`: loadtests.faults.node for the fault
    suite's kill switch)."""

    def __init__(
        self, env: dict[str, str], name: str, module: str = "realtime_safety.realtime"
    ) -> None:
        self.port = free_port()
        self.env = env
        self.name = name
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False  # once: restarts keep the port (clients reconnect to it)
        self.log_path = Path(env["RT_DATA_DIR"]) / f"{name}.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Node:
        """Start the process (again: on the same port). If another process took the port
        free_port() gave us before the first start, start once more on a new one."""
        for _attempt in range(3):
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start()
            except RuntimeError:
                taken = "Address already in use" in self.log()[log_size:]
                if self.started or not taken:
                    raise
            old = self.http
            self.port = free_port()
            if self.env.get("RT_PUBLIC_URL") == old:
                self.env["RT_PUBLIC_URL"] = self.http
        raise RuntimeError(f"{self.name}: no free port after 3 attempts")

    log_level = "warning"  # of the server's own log
    makes_data_dir = True  # False: the server makes RT_DATA_DIR itself (log_path is elsewhere)

    def _start(self) -> Node:
        if self.makes_data_dir:  # as the server makes it (a wider one is warned about)
            Path(self.env["RT_DATA_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.module,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                self.log_level,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        try:
            wait_port(self.port, timeout=30, proc=self.proc)
        except Exception:
            raise RuntimeError(f"{self.name} did not start:\n{self.log()}") from None
        self.started = True
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def api(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: object
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
        return httpx.request(method, self.http + path, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample of the node's /metrics with exactly these labels (None: not there)."""
        text = httpx.get(self.http + "/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            sample, value = line.rsplit(" ", 1)
            got_name, _, got_labels = sample.partition("{")
            if got_name != name:
                continue
            got = ",".join(sorted(got_labels.rstrip("}").split(","))) if got_labels else ""
            if got == want:
                return float(value)
        return None

    def connections(self) -> int:
        """Open WebSocket connections on this node (its `rt_connections` gauge). A closed
        connection leaves the gauge only after its presence is withdrawn and published."""
        value = self.metric("rt_connections")
        assert value is not None, f"no rt_connections in {self.name}'s /metrics"
        return int(value)

    def add_member(self, channel: str, user: str) -> None:
        r = self.api("PUT", f"/v1/channels/{channel}/members/{user}")
        assert r.status_code in (200, 201), r.text


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
    env.update(
        {
            "RT_JWT_SECRET": SECRET,
            "RT_API_KEY": API_KEY,
            "RT_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
            # The suite runs on a busy machine, where a node's event loop is often late: lag
            # would shed chat ops at random. Shedding is tested on purpose (test_overload.py).
            "RT_OVERLOAD_LAG_MS": "60000",
            "RT_OVERLOAD_BACKEND_MS": "60000",
        }
    )
    env.update(extra)
    return env


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[object]:
    nodes: list[Node] = []

    def make(name: str = "node", **env: str) -> Node:
        node = Node(base_env(tmp_path / name, **env), name)
        nodes.append(node)
        return node.start()

    yield make
    for n in nodes:
        n.stop()


def shared_env(redis: RedisServer, mongo_uri: str, **extra: str) -> dict[str, str]:
    """The settings of nodes that share one Redis and one (fresh) MongoDB database, with a
    store timeout that a busy test machine's MongoDB stand-in meets."""
    return {
        "RT_REDIS_URL": redis.url,
        "RT_MONGODB_URI": mongo_uri,
        "RT_MONGODB_DB": unique_db(),
        "RT_STORE_TIMEOUT_S": "10",
        **extra,
    }


def running_node(data_dir: Path, name: str, **env: str) -> Iterator[Node]:
    """A node on `data_dir` (with `base_env` and `env`), started, for a fixture to yield from;
    stopped after."""
    node = Node(base_env(data_dir, **env), name)
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def single_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One embedded-defaults node shared by a module's protocol tests (small limits so the
    limit paths are reachable in a test)."""
    yield from running_node(
        tmp_path_factory.mktemp("single"),
        "single",
        RT_RECOVERY_LIMIT="5",
        RT_AUTH_TIMEOUT_S="1",
        RT_RATE_PER_S="500",
        RT_RATE_BURST="500",
        RT_SEND_QUEUE_FRAMES="64",
        RT_MAX_SUBSCRIPTIONS="20",
    )


# --- alerts: the fake providers and a node wired to them ---------------------------------


@pytest.fixture
def fakes() -> Iterator[FakeProviders]:
    """Local fake token/FCM/Twilio servers, reached by the nodes through the real SDKs."""
    with FakeProviders() as f:
        yield f


@pytest.fixture
def alert_node(tmp_path: Path, fakes: FakeProviders) -> Iterator[Node]:
    """One embedded node whose alerts go to `fakes` (fast retries, status callbacks)."""
    node = Node(
        base_env(tmp_path / "n", RT_ALERT_RETRY_BASE_S="0.05", **fakes.env(tmp_path)), "alerts"
    )
    node.env["RT_PUBLIC_URL"] = node.http
    node.start()
    yield node
    node.stop()
