"""A small mutation-testing runner (issue 24): one AST-level mutation at a time, in a copy of
the tree, judged by the test files mapped to the mutated package.

Why not mutmut 3: it selects the active mutant with MUTANT_UNDER_TEST and trampolines, which a
server subprocess would inherit, but it decides *which tests run against a mutant* from the
trampoline hits recorded in the pytest process only (mutmut/stats.py, record_trampoline_hit):
code run only by the server subprocesses is never recorded, so its mutants end up "no tests"
and are never run. Here every mutant of a package is run against the whole
list of test files mapped to that package, and the mutated file is real source on disk.

How the mutant reaches the server subprocesses: the tests run with cwd = the copy
(`python -m pytest`), so `tests/conftest.py` computes ROOT = the copy and starts
`python -m realtime_safety.realtime serve` / `python -m realtime_safety.loadtests.faults.node`
with cwd = the copy. The copy holds a `realtime_safety/` folder of symlinks to its package
folders (what the installed distribution maps), and `-m` puts the cwd first on sys.path, ahead
of the editable install's finder (which points at the original checkout), so both the pytest
process and every server import the mutated source.
No bytecode is written in the copy (PYTHONDONTWRITEBYTECODE=1, no __pycache__ copied), so a
same-size mutation written within the same second can never be masked by a stale .pyc.

Usage: scripts/mutate [package ...] [--sample N] [--seed S] [--list] [--only ID ...]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "realtime_safety"  # the one import package the distribution installs (pyproject)
FOLDERS = (
    "protocol",
    "moderation",
    "client",
    "realtime",
    "channels",
    "alerts",
    "crypto",
    "presence",
    "storage",
    "loadtests",
)
REASONS_FILE = ROOT / "docs" / "mutation-reasons.json"
DOC = ROOT / "docs" / "mutation.md"

# package -> (source files mutated, test files or pytest node ids that judge its mutants). A
# mutant is judged by these only: the ones that exercise the package (in process or through
# real servers).
PACKAGES: dict[str, tuple[list[str], list[str]]] = {
    "channels": (
        ["channels/*.py"],
        [
            "tests/test_codec.py",
            "tests/test_hub.py",
            "tests/test_protocol.py",
            # cross-node control events and deletions (added after the first run's survivors)
            "tests/test_cluster.py::test_membership_changes_take_effect_on_every_node",
            "tests/test_moderation.py::test_watch_delete_and_ban_across_nodes",
            "tests/test_e2ee.py::test_a_removed_member_cannot_read_later_messages",  # rekey
            "tests/test_ordering.py",  # the hub's gap repair and the replay/live merge, stepwise
            # the channel limits of the contract, at each boundary (added after seed 11's sample)
            "tests/test_contract_limits.py::test_history_default_page_is_50_and_has_more_at_the_boundary",
            "tests/test_contract_limits.py::test_history_limit_is_1_to_200",
            "tests/test_contract_limits.py::test_recovery_limit_boundary",
            "tests/test_contract_limits.py::test_subscribe_without_since_seq_replays_nothing",
            "tests/test_contract_limits.py::test_max_subscriptions",
            "tests/test_contract_limits.py::test_max_body_bytes_plaintext",
            "tests/test_contract_limits.py::test_max_body_bytes_envelope",
            "tests/test_contract_limits.py::test_channel_name_length",
            "tests/test_contract_limits.py::test_client_msg_id_length",
            "tests/test_contract_limits.py::test_typing_once_per_second_per_user_and_channel",
        ],
    ),
    "alerts": (
        ["alerts/*.py"],
        [
            "tests/test_alerts.py",
            "tests/test_alerts_promises.py",
            # the features of issue 21 (statuses, cancel window and PINs, check-ins) and the
            # cluster-wide trigger limit and escalation
            "tests/test_alerts_status.py",
            "tests/test_alerts_cancel.py",
            "tests/test_alerts_checkin.py",
            "tests/test_alerts_cluster.py",
            # the alert lane's thread and loop (alerts/lane.py), in process: a few seconds
            "tests/test_alert_lane.py",
            # the warning of an alert with no recipients, as a JSON log line with its connection
            "tests/test_metrics.py::test_json_logs_carry_the_node_and_the_connection",
        ],
    ),
    "crypto": (
        ["crypto/*.py"],
        [
            "tests/test_e2ee.py",
            # E2EE v2 (issue 20): the libraries against their vectors, the server's ops, the
            # client end to end and against a hostile server
            "tests/test_crypto_identity.py",
            "tests/test_crypto_transparency.py",
            "tests/test_crypto_envelope.py",
            "tests/test_crypto_membership.py",
            "tests/test_crypto_device_link.py",
            "tests/test_e2ee_directory.py",
            "tests/test_e2ee_member_log.py",
            "tests/test_e2ee_server_todevice.py",
            "tests/test_e2ee_v2.py",
            "tests/test_hostile_server.py",
            # the key directory's documented bounds, as numbers (added after seed 7's sample)
            "tests/test_contract_limits.py::test_keys_lookup_takes_1_to_100_users",
            "tests/test_contract_limits.py::test_keys_share_sealed_box_is_48_to_256_bytes",
        ],
    ),
    "presence": (
        ["presence/*.py"],
        [
            "tests/test_presence.py",
            # the `presence` op's reply for an invisible user (the op moved to presence/ops.py)
            "tests/test_mutants_session.py::test_an_invisible_user_looks_exactly_offline",
        ],
    ),
    "storage": (["storage/*.py"], ["tests/test_storage.py", "tests/test_durability.py"]),
    "moderation": (
        ["moderation/*.py"],
        [
            "tests/test_moderation.py",
            "tests/test_protocol.py",
            # the watch patterns' bounds and mod.unwatch's reply (written for the session run)
            "tests/test_mutants_session.py::test_watch_patterns_are_1_to_255_character_strings",
            "tests/test_mutants_session.py::test_unwatch_removes_one_pattern_or_all",
        ],
    ),
    "session": (
        [
            "realtime/connection.py",
            "realtime/node.py",
            "realtime/outbox.py",
            "realtime/ratelimit.py",
            "realtime/features.py",
            "realtime/websocket.py",
            "protocol/*.py",
        ],
        [
            "tests/test_codec.py",
            "tests/test_outgoing.py",
            "tests/test_arrival.py",
            "tests/test_overload.py",
            "tests/test_protocol.py",
            "tests/test_moderation.py",
            "tests/test_faults_input.py",
            # the alert ops' dispatch (added after the first run's survivors)
            "tests/test_alerts.py::test_an_alert_reaches_every_route_once_and_nobody_else",
            # the rekey push when a member is removed (realtime/node.py)
            "tests/test_e2ee.py::test_a_removed_member_cannot_read_later_messages",
        ],
    ),
}
# Extra test files per package (tests/test_mutants_<package>.py), used when present.
OWN_TESTS = "tests/test_mutants_{package}.py"

LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
LOGGER_NAMES = {"log", "logger", "_log", "_logger", "logging", "LOG"}


@dataclass(frozen=True)
class Mutant:
    id: str  # path:line:col:kind — stable while the file's text does not move
    path: str
    line: int
    kind: str
    description: str
    start: int  # byte offsets of the replaced span in the original file
    end: int
    replacement: str

    def apply(self, source: bytes) -> bytes:
        return source[: self.start] + self.replacement.encode() + source[self.end :]


@dataclass
class Result:
    id: str
    path: str
    line: int
    description: str
    outcome: str  # killed | survived | timeout | error
    seconds: float
    killed_by: str = ""


@dataclass
class PackageReport:
    package: str
    tests: list[str]
    seed: int
    sample: int
    total_mutants: int
    baseline_seconds: float
    results: list[Result] = field(default_factory=list)


# --- finding mutations -----------------------------------------------------------------------

CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
BIN_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
    ast.BitXor: ast.BitOr,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
SYMBOL = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitOr: "|",
    ast.BitAnd: "&",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
}


def short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Finder:
    def __init__(self, path: str, source: bytes) -> None:
        self.path = path
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.offsets = [0]
        for line in self.lines:
            self.offsets.append(self.offsets[-1] + len(line))
        self.tree = ast.parse(source)
        self.baseline = ast.dump(self.tree)
        self.skip: set[int] = set()  # id() of nodes never mutated (docstrings, annotations…)
        self.found: list[Mutant] = []

    def span(self, node: ast.AST) -> tuple[int, int]:
        start = self.offsets[node.lineno - 1] + node.col_offset  # type: ignore[attr-defined]
        end = self.offsets[node.end_lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]
        return start, end

    def text(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.source[start:end].decode()

    def add(self, node: ast.AST, kind: str, description: str, replacement: str) -> None:
        line = node.lineno  # type: ignore[attr-defined]
        if b"pragma: no mutate" in self.lines[line - 1]:
            return
        start, end = self.span(node)
        mutant = Mutant(
            id=f"{self.path}:{line}:{node.col_offset}:{kind}",  # type: ignore[attr-defined]
            path=self.path,
            line=line,
            kind=kind,
            description=description,
            start=start,
            end=end,
            replacement=replacement,
        )
        try:  # only mutations that parse and change the program
            changed = ast.dump(ast.parse(mutant.apply(self.source))) != self.baseline
        except SyntaxError:
            return
        if changed:
            self.found.append(mutant)

    def mark_skipped(self) -> None:
        for node in ast.walk(self.tree):
            body = getattr(node, "body", None)
            if (
                isinstance(body, list)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                self.skip_tree(body[0])  # docstring
            if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
                self.skip_tree(node.annotation)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
                self.skip_tree(node.returns)
            if isinstance(node, ast.JoinedStr):  # f-string parts: positions unreliable on 3.11
                self.skip_tree(node)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                self.skip_tree(node)
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "__all__"
            ):
                self.skip_tree(node)
            if isinstance(node, ast.Call) and is_log_call(node):
                self.skip_tree(node)
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                for arg in node.exc.args:  # exception messages: for people, not for code
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        self.skip.add(id(arg))

    def skip_tree(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            self.skip.add(id(sub))

    def run(self) -> list[Mutant]:
        self.mark_skipped()
        for node in ast.walk(self.tree):
            if id(node) in self.skip or not hasattr(node, "lineno"):
                continue
            self.visit(node)
        self.found.sort(key=lambda m: (m.start, m.kind))
        return self.found

    def visit(self, node: ast.AST) -> None:
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                swap = CMP_SWAP.get(type(op))
                if swap is None:
                    continue
                ops = list(node.ops)
                ops[i] = swap()
                new = ast.Compare(node.left, ops, node.comparators)
                desc = f"`{SYMBOL[type(op)]}` → `{SYMBOL[swap]}` in `{short(self.text(node))}`"
                self.add(node, f"cmp{i}", desc, f"({ast.unparse(new)})")
        elif isinstance(node, ast.BoolOp):
            other: ast.boolop = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            names = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            new_bool = ast.BoolOp(other, node.values)
            desc = f"`{names[0]}` → `{names[1]}` in `{short(self.text(node))}`"
            self.add(node, "bool", desc, f"({ast.unparse(new_bool)})")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            desc = f"`not` removed in `{short(self.text(node))}`"
            self.add(node, "not", desc, f"({ast.unparse(node.operand)})")
        elif isinstance(node, ast.BinOp):
            swap_op = BIN_SWAP.get(type(node.op))
            if swap_op is not None:
                new_bin = ast.BinOp(node.left, swap_op(), node.right)
                desc = (
                    f"`{SYMBOL[type(node.op)]}` → `{SYMBOL[swap_op]}` in `{short(self.text(node))}`"
                )
                self.add(node, "binop", desc, f"({ast.unparse(new_bin)})")
        elif isinstance(node, ast.AugAssign):
            swap_op = BIN_SWAP.get(type(node.op))
            if swap_op is not None:
                new_aug = ast.AugAssign(node.target, swap_op(), node.value)
                desc = f"`{SYMBOL[type(node.op)]}=` → `{SYMBOL[swap_op]}=`"
                self.add(
                    node, "augop", desc + f" in `{short(self.text(node))}`", ast.unparse(new_aug)
                )
        elif isinstance(node, ast.Constant):
            self.constant(node)
        elif isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                desc = f"`{short(self.text(node))}` → `return None`"
                self.add(node, "return", desc, "return None")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call | ast.Await):
            self.add(node, "delete", f"`{short(self.text(node))}` removed", "pass")
        elif isinstance(node, ast.Break):
            self.add(node, "break", "`break` → `continue`", "continue")
        elif isinstance(node, ast.Continue):
            self.add(node, "continue", "`continue` → `break`", "break")
        if isinstance(node, ast.If | ast.While) and not isinstance(node.test, ast.Constant):
            test = node.test
            desc = f"condition negated: `{short(self.text(test))}`"
            self.add(test, "negate", desc, f"(not ({self.text(test)}))")

    def constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self.add(node, "const", f"`{value}` → `{not value}`", repr(not value))
        elif isinstance(value, int):
            self.add(node, "const", f"`{value}` → `{value + 1}`", f"({value + 1})")
        elif isinstance(value, float):
            self.add(node, "const", f"`{value}` → `{value + 1}`", f"({value + 1})")
        elif isinstance(value, str) and value:
            new = "XX" + value + "XX"
            self.add(
                node, "const", f"`{short(repr(value), 40)}` → `{short(repr(new), 44)}`", repr(new)
            )


def is_log_call(node: ast.Call) -> bool:
    func = node.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr in LOG_METHODS
        and isinstance(func.value, ast.Name)
        and func.value.id in LOGGER_NAMES
    )


def package_files(root: Path, package: str) -> list[str]:
    globs, _ = PACKAGES[package]
    files: set[str] = set()
    for pattern in globs:
        files.update(str(p.relative_to(root)) for p in root.glob(pattern))
    return sorted(files)


def find_mutants(root: Path, package: str) -> list[Mutant]:
    mutants: list[Mutant] = []
    for rel in package_files(root, package):
        mutants.extend(Finder(rel, (root / rel).read_bytes()).run())
    return mutants


def package_tests(root: Path, package: str) -> list[str]:
    tests = list(PACKAGES[package][1])
    own = OWN_TESTS.format(package=package)
    if (root / own).exists():
        tests.append(own)
    return tests


# --- running ---------------------------------------------------------------------------------


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files (no __pycache__, no
    data, no artifacts): what `git status` would show, mutated one file at a time."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("test-artifacts/", "loadtests/results/")):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    # the installed layout: realtime_safety.<folder> is the copy's <folder>
    (dest / NAMESPACE).mkdir()
    for folder in FOLDERS:
        (dest / NAMESPACE / folder).symlink_to(Path("..") / folder, target_is_directory=True)


def test_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RT_", "PYTEST_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPATH", None)
    return env


@dataclass
class Run:
    returncode: int | None  # None: timed out
    seconds: float
    output: str


def run_tests(tree: Path, tests: list[str], deadline: float, per_test: int) -> Run:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-rfE",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        f"--timeout={per_test}",
        *tests,
    ]
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            cmd, cwd=tree, env=test_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc: int | None = proc.wait(deadline)
        except subprocess.TimeoutExpired:
            rc = None
        # the whole session: pytest and every server / redis-server it started
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        out.seek(0)
        output = out.read().decode(errors="replace")
    return Run(rc, time.monotonic() - started, output)


def first_failure(output: str) -> str:
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+)", line)
        if m:
            return m.group(2)
    return ""


def check_imports(tree: Path) -> None:
    """The copy, not the editable install's checkout, is what `python -m` imports there."""
    code = (
        f"import importlib; ms = [importlib.import_module('{NAMESPACE}.' + f)"
        f" for f in {FOLDERS!r}];"
        "print('\\n'.join(m.__file__ for m in ms))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=test_env(), capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    for path in out.split():
        if not Path(path).resolve().is_relative_to(tree.resolve()):
            sys.exit(f"mutate: {path} is imported from outside the mutated copy {tree}")


def run_package(
    tree: Path,
    package: str,
    sample: int,
    seed: int,
    only: list[str],
    per_test: int,
    tests_override: list[str],
    earlier: dict[str, Result],
) -> PackageReport:
    mutants = find_mutants(tree, package)
    tests = tests_override or package_tests(tree, package)
    if only:
        chosen = [m for m in mutants if m.id in only]
    elif sample and sample < len(mutants):
        chosen = sorted(
            random.Random(f"{seed}:{package}").sample(mutants, sample), key=lambda m: m.id
        )
    else:
        chosen = mutants
    print(f"== {package}: {len(mutants)} mutants, trying {len(chosen)}; tests: {' '.join(tests)}")
    base = run_tests(tree, tests, deadline=900, per_test=per_test)
    if base.returncode != 0:
        print(base.output[-4000:])
        sys.exit(f"mutate: the unmutated tests of {package} do not pass (rc {base.returncode})")
    print(f"   baseline passes in {base.seconds:.1f}s")
    report = PackageReport(package, tests, seed, sample, len(mutants), round(base.seconds, 1))
    deadline = max(60.0, 3 * base.seconds + 30)
    for n, mutant in enumerate(chosen, 1):
        if mutant.id in earlier:
            done = earlier[mutant.id]
            report.results.append(done)
            print(f"   [{n}/{len(chosen)}] {done.outcome:8} (earlier run) {mutant.id}")
            continue
        path = tree / mutant.path
        original = path.read_bytes()
        path.write_bytes(mutant.apply(original))
        try:
            run = run_tests(tree, tests, deadline, per_test)
        finally:
            path.write_bytes(original)
        if run.returncode is None:
            outcome = "timeout"
        elif run.returncode == 0:
            outcome = "survived"
        elif run.returncode in (1, 2, 3):  # failed / collection error / internal error
            outcome = "killed"
        else:
            outcome = "error"
        result = Result(
            mutant.id, mutant.path, mutant.line, mutant.description, outcome,
            round(run.seconds, 1), first_failure(run.output),
        )  # fmt: skip
        report.results.append(result)
        print(
            f"   [{n}/{len(chosen)}] {outcome:8} {run.seconds:5.1f}s {mutant.path}:{mutant.line} "
            f"{mutant.description}" + (f"  ({result.killed_by})" if result.killed_by else "")
        )
        if outcome == "error":
            print(run.output[-2000:])
    return report


# --- reporting -------------------------------------------------------------------------------


def counts(report: PackageReport) -> dict[str, int]:
    c = {"tried": len(report.results), "killed": 0, "survived": 0, "timeout": 0, "error": 0}
    for r in report.results:
        c[r.outcome] += 1
    return c


def fixed(reason: str) -> bool:
    """A survivor since killed: a test was added for it, or a mapped test kills it."""
    return "kills it" in reason or reason.startswith("mapping gap")


def render(reports: list[PackageReport], reasons: dict[str, str]) -> Iterator[str]:
    yield "## Results"
    yield ""
    yield (
        "Written by `scripts/mutate` (see CONTRIBUTING.md, “Mutation testing”); the verdicts "
        "come from `docs/mutation-reasons.json`. A survivor's verdict is *equivalent* (no test "
        "can tell), *accepted* (a difference we choose not to test) or *needs a test* (then the "
        "test that now kills it). Score = (killed + timed out) / tried; *score now* also counts "
        "the survivors that a test added since (or a test file added to the package's mapping) "
        "was shown to kill with `--only`."
    )
    yield ""
    yield (
        "| package | mutants | tried | killed | survived | timed out | score | score now "
        "| tests (s) |"
    )
    yield "|---|---|---|---|---|---|---|---|---|"
    for rep in reports:
        c = counts(rep)
        judged = c["tried"] - c["error"]
        detected = c["killed"] + c["timeout"]
        since = sum(
            1 for r in rep.results if r.outcome == "survived" and fixed(reasons.get(r.id, ""))
        )
        score = f"{100 * detected / judged:.0f}%" if judged else "—"
        now = f"{100 * (detected + since) / judged:.0f}%" if judged else "—"
        yield (
            f"| {rep.package} | {rep.total_mutants} | {c['tried']} | {c['killed']} | "
            f"{c['survived']} | {c['timeout']} | {score} | {now} | {rep.baseline_seconds} |"
        )
    for rep in reports:
        c = counts(rep)
        yield ""
        yield f"### {rep.package}"
        yield ""
        yield (
            f"Sample of {c['tried']} of {rep.total_mutants} mutants (seed {rep.seed}): "
            f"{c['killed']} killed, {c['survived']} survived, {c['timeout']} timed out"
            + (f", {c['error']} errors" if c["error"] else "")
            + ". Judged by "
            + ", ".join(f"`{t}`" for t in rep.tests)
            + "."
        )
        survivors = [r for r in rep.results if r.outcome == "survived"]
        if survivors:
            yield ""
            yield "| survivor | mutation | verdict |"
            yield "|---|---|---|"
            for r in survivors:
                reason = reasons.get(r.id, "unreviewed")
                desc = r.description.replace("|", "\\|")
                yield f"| `{r.id}` | {desc} | {reason} |"
        odd = [r for r in rep.results if r.outcome in ("timeout", "error")]
        for r in odd:
            yield f"- {r.outcome}: `{r.id}` {r.description}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/mutate", description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", help=f"default: all of {', '.join(PACKAGES)}")
    parser.add_argument("--sample", type=int, default=20, help="mutants per package (0: all)")
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--only", nargs="+", default=[], help="run these mutant ids only")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--tests", nargs="+", default=[], help="judge by these instead")
    parser.add_argument(
        "--resume",
        nargs="+",
        type=Path,
        default=[],
        help="earlier --json results: their killed / timed-out mutants are not run again",
    )
    parser.add_argument("--per-test-timeout", type=int, default=60)
    parser.add_argument("--json", type=Path, help="write the results here (JSON)")
    parser.add_argument("--markdown", type=Path, help="write the results here (Markdown)")
    parser.add_argument("--keep", action="store_true", help="keep the mutated copy")
    parser.add_argument(
        "--from-json", nargs="+", type=Path, default=[], help="run nothing: render these results"
    )
    args = parser.parse_args()
    if args.from_json:
        loaded = [
            load_report(item) for file in args.from_json for item in json.loads(file.read_text())
        ]
        publish(loaded, args.json, args.markdown)
        return
    packages = args.packages or list(PACKAGES)
    for p in packages:
        if p not in PACKAGES:
            parser.error(f"unknown package {p!r} (one of {', '.join(PACKAGES)})")
    if args.list:
        for p in packages:
            for m in find_mutants(ROOT, p):
                print(f"{m.id}\t{m.description}")
        return
    # A kill stays a kill when the tests only grow, so earlier kills are reused; survivors
    # (and errors) are judged again.
    earlier: dict[str, Result] = {
        r.id: r
        for file in args.resume
        for item in json.loads(file.read_text())
        for r in load_report(item).results
        if r.outcome in ("killed", "timeout")
    }
    tree = Path(tempfile.mkdtemp(prefix="rt-mutate-"))
    try:
        copy_tree(tree)
        check_imports(tree)
        print(f"mutated copy: {tree}")
        reports = [
            run_package(
                tree,
                p,
                args.sample,
                args.seed,
                args.only,
                args.per_test_timeout,
                args.tests,
                earlier,
            )
            for p in packages
        ]
    finally:
        if not args.keep:
            shutil.rmtree(tree, ignore_errors=True)
    publish(reports, args.json, args.markdown)


def load_report(item: dict[str, Any]) -> PackageReport:
    results = [Result(**r) for r in item.pop("results")]
    return PackageReport(**item, results=results)


def publish(reports: list[PackageReport], json_out: Path | None, md_out: Path | None) -> None:
    reasons: dict[str, str] = {}
    if REASONS_FILE.exists():
        reasons = json.loads(REASONS_FILE.read_text())
    order = list(PACKAGES)
    reports = sorted(reports, key=lambda r: order.index(r.package))
    text = "\n".join(render(reports, reasons)) + "\n"
    print()
    print(text)
    if json_out:
        json_out.write_text(json.dumps([asdict(r) for r in reports], indent=1) + "\n")
    if md_out:
        write_markdown(md_out, text)


BEGIN, END = "<!-- scripts/mutate: begin -->", "<!-- scripts/mutate: end -->"


def write_markdown(path: Path, text: str) -> None:
    """The whole file, or only what lies between the markers when the file has them (so
    hand-written notes around the generated tables survive a new run)."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    else:
        path.write_text(text)


if __name__ == "__main__":
    main()
