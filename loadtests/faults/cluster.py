"""Real processes to inject faults into: one Redis, one MongoDB (a SecantusDB process unless
MONGODB_URI is set) and `realtime serve` nodes sharing them, on loopback ports, each a child
process the scenario can SIGKILL, SIGSTOP/SIGCONT or start again on the same port.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from ..support import free_port, redis_command, secantus_command, wait_port
from ..targets import Ours


class Proc:
    """One child process on a fixed loopback port: start (again), kill, pause, resume."""

    def __init__(
        self, name: str, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.port = port
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self, timeout: float = 60) -> None:
        self.spawn()
        self.wait_listening(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (see `wait_listening`)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_port(self.port, 0.2)
                return
            except TimeoutError:
                if self.running and time.monotonic() < deadline:
                    continue
                self.stop()
                raise RuntimeError(f"{self.name} did not listen:\n{self.tail()}") from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.running:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap it: the port is free once this returns."""
        if self.proc is not None and self.running:
            self.proc.kill()
            self.proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.proc is None or not self.running:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Cluster:
    """`with Cluster(nodes=2) as c:` one Redis, one MongoDB and `nodes` server nodes."""

    def __init__(
        self,
        nodes: int = 2,
        *,
        store_timeout_s: float = 2.0,
        own_mongo: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="rt-faults-"))
        self.secret = secrets.token_hex(32)
        self.target = Ours(self.secret)
        self.store_timeout_s = store_timeout_s
        self.keep = False  # keep the work directory (logs) when closing
        redis_port = free_port()
        self.redis = Proc(
            "redis", redis_command(redis_port, str(self.work)), redis_port, self.work / "redis.log"
        )
        self.mongo: Proc | None = None
        uri = os.environ.get("MONGODB_URI")
        if own_mongo or not uri:
            port = free_port()
            (self.work / "mongo").mkdir()
            self.mongo = Proc(
                "mongodb",
                secantus_command(port, str(self.work / "mongo")),
                port,
                self.work / "mongo.log",
            )
            uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
        env.update(
            {
                "RT_JWT_SECRET": self.secret,
                "RT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "RT_MONGODB_URI": uri,
                "RT_MONGODB_DB": "rt_faults_" + uuid.uuid4().hex[:10],
                "RT_STORE_TIMEOUT_S": str(store_timeout_s),
                "RT_RATE_PER_S": "100000",
                "RT_RATE_BURST": "100000",
                "PYTHONUNBUFFERED": "1",
                **(extra_env or {}),
            }
        )
        self.nodes: list[Proc] = []
        for n in range(nodes):
            port = free_port()
            cmd = self.target.command(port)
            cmd[cmd.index("--log-level") + 1] = "warning"  # the faults are worth reading about
            data = self.work / f"node{n}"
            data.mkdir()
            node_env = {**env, "RT_NODE_ID": f"node{n}", "RT_DATA_DIR": str(data)}
            self.nodes.append(Proc(f"node{n}", cmd, port, self.work / f"node{n}.log", node_env))

    def url(self, n: int) -> str:
        return self.target.url(self.nodes[n].port)

    def token(self, user: str) -> str:
        return self.target.token(user)

    def __enter__(self) -> Cluster:
        try:
            # The nodes start side by side, once their Redis and MongoDB listen.
            self.redis.start()
            if self.mongo is not None:
                self.mongo.start()
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_listening()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.keep = self.keep or exc is not None
        self.close()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.tail()}" for p in [*self.nodes, self.redis] if p.tail()
        )

    def close(self) -> None:
        # SIGKILL: the scenario is over and its data is thrown away, so a clean shutdown
        # (a node's drain, MongoDB's checkpoint: seconds) would buy nothing.
        for proc in [*self.nodes, self.redis, *([self.mongo] if self.mongo else [])]:
            proc.kill()
        if not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)
