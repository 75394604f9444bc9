"""One embedded node for the hostile-input and resource-attack scenarios (`badinput.py`,
`exhaustion.py`): a `realtime serve` process on the embedded store, killed on exit, and what
the scenarios measure on it (its RSS and open files over time)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt

from ..support import free_port, proc_stats, wait_port

MB = 1024 * 1024


class EmbeddedNode:
    """A `realtime serve` process on the embedded store, killed on exit."""

    def __init__(self, **env: str) -> None:
        self.secret = secrets.token_hex(32)
        self.work = Path(tempfile.mkdtemp(prefix="rt-faults-"))
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RT_")},
            "RT_JWT_SECRET": self.secret,
            "RT_DATA_DIR": str(self.work),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EmbeddedNode:
        log = open(self.work / "node.log", "wb")
        cmd = [sys.executable, "-m", "realtime_safety.realtime", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level", "warning"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        return proc_stats(self.pid)[1]

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def open_sockets(self) -> int:
        """Sockets the node holds (files it opens lazily, such as SQLite's, are not counted)."""
        return sum(1 for target in self._fd_targets() if target.startswith("socket:"))

    def _fd_targets(self) -> list[str]:
        targets = []
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                targets.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
            except OSError:  # closed while listed
                pass
        return targets

    def log(self) -> str:
        return (self.work / "node.log").read_text(errors="replace")

    def token(self, user: str, ttl: float = 3600) -> str:
        claims = {"sub": user, "roles": ["user"], "exp": time.time() + ttl}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


class RssSampler:
    """The node's RSS every `every` seconds, on the event loop, until stopped."""

    def __init__(self, node: EmbeddedNode, every: float = 0.2) -> None:
        self.node, self.every = node, every
        self.samples: list[int] = []
        self.files: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while self.node.alive():
            self.samples.append(self.node.rss())
            self.files.append(self.node.open_files())
            await asyncio.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self.samples.append(self.node.rss())
        self.files.append(self.node.open_files())
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.node.alive():
            self.samples.append(self.node.rss())

    def figures(self) -> dict[str, float]:
        return {
            "rss_start_mb": round(self.samples[0] / MB, 1),
            "rss_peak_mb": round(max(self.samples) / MB, 1),
            "rss_end_mb": round(self.samples[-1] / MB, 1),
        }


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def until(predicate: Any, timeout: float, every: float = 0.05) -> bool:
    """Wait for a condition (polled), at most `timeout` seconds; whether it came true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True
