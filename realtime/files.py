"""Data at rest is the server account's alone: the data directory holds phone numbers,
locations and alert notes (the SQLite store and its -wal/-shm files, the development outbox)
and an export holds everything the store holds.

`realtime` runs with umask 077, so whatever it creates is 0700 (directories) or 0600 (files);
the store, the outbox and exports also ask for those modes themselves, so the rule holds when
the code runs in another process. At start-up `check_private` warns about anything in the data
directory that other accounts may read (left by an older version, or made by hand).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
_SHOWN = 10  # paths named in the warning; the rest are counted

log = logging.getLogger("realtime.files")


def make_private() -> None:
    """From now on this process creates files 0600 and directories 0700."""
    os.umask(PRIVATE_UMASK)


def too_open(data_dir: Path) -> list[tuple[Path, int]]:
    """The data directory and everything under it whose mode lets group or others in."""
    found: list[tuple[Path, int]] = []
    if not data_dir.is_dir():
        return found
    paths = [data_dir]
    for root, dirs, files in os.walk(data_dir):
        paths.extend(Path(root) / n for n in (*dirs, *files))
    for path in paths:
        try:
            st = path.lstat()
        except OSError:
            continue  # gone meanwhile
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
            found.append((path, stat.S_IMODE(st.st_mode)))
    return found


def check_private(data_dir: Path) -> None:
    """One warning line if the data directory or anything in it is open to other accounts."""
    found = too_open(data_dir)
    if not found:
        return
    named = ", ".join(f"{p} ({mode:04o})" for p, mode in found[:_SHOWN])
    more = f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    log.warning(
        "data at rest readable by other local accounts: %s%s; it holds phone numbers, "
        "locations and alert notes: chmod 700 the directory and 600 its files",
        named,
        more,
    )
