"""The house's rules (issue 16), read from the source: the wire vocabulary is the ground floor,
no feature imports the server, the packages form no import loop, and no module outgrows
~450 lines. A newcomer can trust the folder tree."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS = "realtime_safety."
PACKAGES = (
    "protocol", "storage", "channels", "presence", "crypto", "alerts", "moderation", "client",
    "realtime", "loadtests",
)  # fmt: skip
# What each package may import of ours (besides itself). The server and the benchmarks sit on
# top; everything else is a feature over the ground floor.
ALLOWED = {
    "protocol": set(),
    "storage": {"protocol"},
    "client": {"protocol"},
    "channels": {"protocol", "storage"},
    "presence": {"protocol", "channels"},
    "alerts": {"protocol", "storage"},
    "crypto": {"protocol", "storage", "channels", "client"},
    "moderation": {"protocol", "storage", "channels", "crypto"},
}
MAX_LINES = 470  # "~450"


def imports_of(package: str) -> dict[str, set[str]]:
    """module path -> our packages it imports (at any depth, TYPE_CHECKING included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "django_peer" in path.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        ours = {n[len(NS) :].split(".")[0] for n in names if n.startswith(NS)}
        found[str(path.relative_to(ROOT))] = ours - {package}
    return found


def test_each_package_imports_only_the_floors_below_it() -> None:
    wrong = [
        f"{module} imports {sorted(used - ALLOWED[package])}"
        for package in ALLOWED
        for module, used in imports_of(package).items()
        if used - ALLOWED[package]
    ]
    assert wrong == []


def test_the_packages_form_no_import_loop() -> None:
    graph = {p: set().union(*imports_of(p).values()) for p in PACKAGES}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:  # pragma: no cover - the failure message
        raise AssertionError(f"import loop: {exc.args[1]}") from None
    assert order[0] == "protocol" and order[-1] in ("realtime", "loadtests")


def test_no_package_module_outgrows_the_limit() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_checks_see_real_imports() -> None:
    """The rules above are not vacuous: the server does import every feature."""
    used = set().union(*imports_of("realtime").values())
    assert used >= {"protocol", "channels", "presence", "crypto", "alerts", "moderation"}
