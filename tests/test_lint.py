"""The repository is ruff clean (`ruff check`, the rules in pyproject.toml). The rest of
`scripts/lint` (`ruff format --check`, `mypy --strict`) is not run here: mypy takes half a
minute from a cold cache (CONTRIBUTING.md, "Lint and types")."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ruff_check_is_clean_on_every_package_the_tests_and_the_scripts() -> None:
    # What ruff checks: every package folder (pyproject's package-dir), tests/ and scripts/ are
    # in it, so a folder dropped from the check (an `exclude`, a stray ignore file) fails here.
    listed = ruff("check", "--show-files", ".")
    assert listed.returncode == 0, listed.stderr
    checked = {
        Path(line).relative_to(ROOT).parts[0]
        for line in listed.stdout.splitlines()
        if line.startswith(str(ROOT) + "/")
    }
    with open(ROOT / "pyproject.toml", "rb") as f:
        folders = set(tomllib.load(f)["tool"]["setuptools"]["package-dir"].values())
    assert folders | {"tests", "scripts"} <= checked, sorted(checked)

    result = ruff("check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr
