"""`realtime export` / `realtime import`: every record of a store as plain documents.

The export is a directory with one file per kind of record (`messages.jsonl`,
`channel_heads.jsonl`, `memberships.jsonl`, `read_markers.jsonl`), one MongoDB Extended JSON
(relaxed) document per line — byte fields as `{"$binary": …}` — plus `meta.json`. It reads the
same from either store, so it backs up a single node, moves a single node to MongoDB
(export from SQLite, import into MongoDB), and can also be fed to `mongoimport`.
Import is idempotent: records already present are skipped, and `seq`s are kept as they were.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

from bson import json_util

from .base import RECORD_KINDS, Store

FORMAT = "realtime-export"
FORMAT_VERSION = 1
_OPTIONS = json_util.JSONOptions(json_mode=json_util.JSONMode.RELAXED)
BATCH = 1000


async def export_store(store: Store, out: Path, *, store_kind: str) -> dict[str, int]:
    # an export holds everything the store holds: the server account's alone (0700 / 0600)
    if not out.exists():
        out.mkdir(mode=0o700, parents=True)
        out.chmod(0o700)
    counts: dict[str, int] = {}
    for kind in RECORD_KINDS:
        n = 0
        tmp = out / f"{kind}.jsonl.tmp"
        with _private(tmp) as f:
            async for record in store.dump(kind):
                f.write(json_util.dumps(record, json_options=_OPTIONS))
                f.write("\n")
                n += 1
        tmp.replace(out / f"{kind}.jsonl")
        counts[kind] = n
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "store": store_kind,
        "schema_version": await store.schema_version(),
        "exported_at": int(time.time()),
        "counts": counts,
    }
    with _private(out / "meta.json") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    return counts


def _private(path: Path) -> TextIO:
    """`path` truncated for writing, created 0600 (an existing file is made 0600 too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "w", encoding="utf-8")


class ImportError_(Exception):
    """The directory is not an export this server can read."""


async def import_store(store: Store, src: Path) -> dict[str, int]:
    meta_path = src / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ImportError_(f"{meta_path}: not a realtime export ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ImportError_(
            f"{meta_path}: unsupported export format {meta.get('format')!r} "
            f"version {meta.get('version')!r}"
        )
    added: dict[str, int] = {}
    for kind in RECORD_KINDS:
        path = src / f"{kind}.jsonl"
        added[kind] = 0
        if not path.exists():
            continue
        batch: list[dict[str, Any]] = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    batch.append(json_util.loads(line, json_options=_OPTIONS))
                except ValueError as exc:
                    raise ImportError_(f"{path}:{number}: {exc}") from None
                if len(batch) >= BATCH:
                    added[kind] += await store.load(kind, batch)
                    batch = []
        added[kind] += await store.load(kind, batch)
    return added
