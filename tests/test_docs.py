"""The README's and the tutorial's shell and Python blocks, run as a reader would (issue 22): in
order, in one working directory (a copy of `scripts/` and this checkout's `.venv`). A ```sh
block runs in bash with what earlier blocks exported; a ```python block is saved as a file and
run with `.venv/bin/python` in that same environment (a reader runs it from the checkout). A
block marked `<!-- doc-test: background PORT... -->` is a server left running in its own
terminal (it must listen on those ports; Ctrl-C stops it at the end), `<!-- doc-test: skip
(why) -->` is not run, and a `<!-- doc-test: output -->` block after a block lists the lines it
must print, in order (`…` stands for anything). Any other block fails the test: nothing shown
to a reader goes unrun unnoticed. Ports are moved to free ones: every `127.0.0.1:<port>` of the
page, `--port` for `scripts/serve`, RT_CLUSTER_BASE_PORT for `scripts/cluster`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"<!-- doc-test: (background|skip|output)\b([^>]*)-->")
RUN = ("sh", "python")  # the languages of the blocks that are run


@dataclass
class Block:
    line: int
    code: str
    mode: str = "run"  # run | background | skip
    lang: str = "sh"  # sh | python
    ports: list[int] = field(default_factory=list)
    output: list[str] = field(default_factory=list)


def blocks(page: Path) -> list[Block]:
    """The page's ```sh and ```python blocks, with their markers and expected output."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    mark: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARK.search(line)
        if m:
            mark = (m.group(1), m.group(2).strip())
        elif line.lstrip().startswith("```"):
            indent = len(line) - len(line.lstrip())  # a block inside a list item
            lang, start = line.strip()[3:].strip(), i + 1
            i += 1
            while not lines[i].lstrip().startswith("```"):
                i += 1
            body = [x[indent:] for x in lines[start:i]]
            if mark is not None and mark[0] == "output":
                assert found, f"{page.name}:{start}: output before any block"
                found[-1].output = [x for x in body if x.strip()]
            else:
                skipped = mark is not None and mark[0] == "skip"
                assert lang in RUN or skipped, (
                    f"{page.name}:{start}: a ```{lang} block is neither run nor marked "
                    "`<!-- doc-test: skip (why) -->` or `<!-- doc-test: output -->`"
                )
                block = Block(start, "\n".join(body) + "\n", lang=lang)
                if mark is not None:
                    block.mode = mark[0]
                    if mark[0] == "background":
                        assert lang == "sh", f"{page.name}:{start}: a background block is sh"
                        block.ports = [int(p) for p in mark[1].split()]
                found.append(block)
            mark = None
        elif line.strip():
            mark = None if not line.lstrip().startswith("<!--") else mark
        i += 1
    return found


def free_ports(n: int) -> list[int]:
    """n consecutive free ports (scripts/cluster takes a base and the next)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            held = []
            for p in range(base, base + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return list(range(base, base + n))
    raise RuntimeError("no free ports")


def matches(expected: list[str], output: str) -> bool:
    """Each expected line matches a line of the output, in order (`…`: anything)."""
    got = iter(output.splitlines())
    for want in expected:
        pattern = re.compile(".*".join(re.escape(part) for part in want.split("…")))
        if not any(pattern.fullmatch(line.rstrip()) for line in got):
            return False
    return True


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Reader:
    """The reader's working directory and terminals."""

    def __init__(self, work: Path) -> None:
        self.work = work
        (work / "scripts").mkdir()
        for name in ("serve", "cluster", "dev-env"):
            shutil.copy2(ROOT / "scripts" / name, work / "scripts" / name)
        (work / ".venv").symlink_to(ROOT / ".venv")
        self.state = work / ".doc-test-env"
        # (PYTHONPATH: a checkout run through another's venv, as in a git worktree)
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "MONGODB_URI", "PYTHONPATH")
        env = {k: v for k, v in os.environ.items() if k in keep}
        self.state.write_text("".join(f"export {k}={_quote(v)}\n" for k, v in env.items()))
        self.env = env
        self.moved: dict[int, int] = {}
        self.servers: list[subprocess.Popen[bytes]] = []

    def move(self, text: str) -> str:
        for old, new in self.moved.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        return text

    def run(self, block: Block, where: str) -> None:
        code = self.move(block.code)
        if block.mode == "background":
            new = free_ports(len(block.ports))
            self.moved.update(zip(block.ports, new, strict=True))
            env = dict(self.env)
            if "scripts/cluster" in code:
                env["RT_CLUSTER_BASE_PORT"] = str(new[0])
            code = code.replace("./scripts/serve", f"./scripts/serve --port {new[0]}")
            log = open(self.work / f"server-{block.line}.log", "wb")
            proc = subprocess.Popen(
                ["bash", "-c", code], cwd=self.work, env=env, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
            self.servers.append(proc)
            deadline = time.monotonic() + 120
            while not all(ready(p) for p in new):
                assert proc.poll() is None, f"{where}: exited; {self._tail(log.name)}"
                assert time.monotonic() < deadline, f"{where}: not ready; {self._tail(log.name)}"
                time.sleep(0.2)
            return
        if block.lang == "python":  # saved as a file, run from the checkout
            saved = self.work / f"block-{block.line}.py"
            saved.write_text(code)
            code = f".venv/bin/python {saved.name}\n"
        script = f"set -euo pipefail\n. {self.state}\n{code}\nexport -p > {self.state}\n"
        done = subprocess.run(
            ["bash", "-c", script], cwd=self.work, env=self.env, capture_output=True,
            text=True, timeout=90,
        )  # fmt: skip
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{out}"
        expected = [self.move(x) for x in block.output]
        assert matches(expected, done.stdout), f"{where} printed:\n{out}\nexpected:\n" + "\n".join(
            expected
        )

    def _tail(self, path: str) -> str:
        return Path(path).read_text(errors="replace")[-2000:]

    def close(self) -> None:
        for proc in self.servers:  # Ctrl-C in its terminal
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                continue
        for proc in self.servers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", ["README.md", "docs/tutorial.md"])
def test_every_block_of_the_page_runs_and_prints_what_it_shows(page: str, tmp_path: Path) -> None:
    if page == "docs/tutorial.md" and shutil.which("redis-server") is None:
        pytest.skip("the tutorial's last part needs redis-server")
    found = blocks(ROOT / page)
    assert any(b.mode == "run" for b in found), f"{page}: no block to run"
    reader = Reader(tmp_path)
    try:
        for block in found:
            if block.mode != "skip":
                reader.run(block, f"{page}:{block.line}")
    finally:
        reader.close()


def test_the_block_reader_sees_markers_and_outputs(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- doc-test: background 8000 -->\n```sh\nserve\n```\n\ntext\n\n```sh\necho hi\n```\n"
        "\n<!-- doc-test: output -->\n```text\nh…\n```\n<!-- doc-test: skip (no) -->\n"
        "```sh\nrm -rf /\n```\n```python\nprint(1)\n```\n<!-- doc-test: output -->\n"
        "```\n1\n```\n- item\n\n  ```sh\n  ls -l\n  ```\n"
        "<!-- doc-test: skip (an example) -->\n```json\n{}\n```\n"
    )
    found = blocks(page)
    assert [(b.mode, b.lang, b.code, b.ports, b.output) for b in found] == [
        ("background", "sh", "serve\n", [8000], []),
        ("run", "sh", "echo hi\n", [], ["h…"]),
        ("skip", "sh", "rm -rf /\n", [], []),
        ("run", "python", "print(1)\n", [], ["1"]),
        ("run", "sh", "ls -l\n", [], []),
        ("skip", "json", "{}\n", [], []),
    ]
    assert matches(["h…", "b"], "x\nhi\ny\nb\n") and not matches(["b", "h…"], "hi\nb\n")
    for unrun in ("```bash\nls\n```\n", "```\nls\n```\n", "```py\nprint(1)\n```\n"):
        page.write_text(unrun)
        with pytest.raises(AssertionError, match="neither run nor marked"):
            blocks(page)
