"""The distribution installs one import package of ours, `realtime_safety` (issue 16): the
repository's folders become its sub-packages, so installing the server next to Django Channels
(`channels`), Supabase's `realtime` or any other project named like one of our folders breaks
neither."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "protocol", "realtime", "channels", "alerts", "presence", "crypto", "storage", "moderation",
    "client",
}  # fmt: skip


def test_the_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=110,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"realtime_safety"}
    inside = {n.split("/")[1] for n in names if n.startswith("realtime_safety/")}
    assert inside >= FOLDERS | {"loadtests"}
    # what the server reads at run time is packaged with it
    assert "realtime_safety/realtime/openapi.json" in names
    assert any(n.startswith("realtime_safety/realtime/console/") for n in names)
    # the console script points into the namespace
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    assert "realtime = realtime_safety.realtime.cli:main" in scripts


def test_our_folder_names_stay_free_for_other_projects() -> None:
    """Imported outside the repository, `channels` & co. are not ours (the editable install
    maps only `realtime_safety.*`)."""
    code = (
        "import importlib.util as u, sys;"
        f"sys.exit(sum(u.find_spec(n) is not None for n in {sorted(FOLDERS)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd="/", timeout=60)
    assert done.returncode == 0
    ours = subprocess.run(
        [sys.executable, "-c", "import realtime_safety.channels.hub"], cwd="/", timeout=60
    )
    assert ours.returncode == 0
