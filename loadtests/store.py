"""Storage benchmark: what one publish costs in the store, with and without group commit.

    python -m realtime_safety.loadtests store --backend sqlite --publishers 1,8,64 --messages 2000

Each publisher appends to its own channel as fast as the store acknowledges (durably: SQLite
`synchronous=FULL`; MongoDB with the configured write concern). Reports appends/s and
per-append latency p50/p99 for each concurrency, with grouping on (up to 256 appends per
transaction) and off (one transaction per append). `--backend mongodb` needs MONGODB_URI: the
local SecantusDB is far too slow to say anything about MongoDB.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from realtime_safety.storage.mongo import MongoStore
from realtime_safety.storage.sqlite import SqliteStore

ENVELOPE = {
    "v": 1,
    "alg": "xchacha20poly1305",
    "device": "d1",
    "key_id": "k1",
    "nonce": os.urandom(24),
    "ct": os.urandom(200),
    "sig": os.urandom(64),
}


@dataclass
class StoreResult:
    backend: str
    grouped: bool
    publishers: int
    appends: int
    appends_per_s: float
    latency_ms_p50: float
    latency_ms_p99: float
    transactions: int | None


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000, 3)


async def _run_one(backend: str, grouped: bool, publishers: int, messages: int) -> StoreResult:
    if backend == "sqlite":
        store = SqliteStore(Path(tempfile.mkdtemp(prefix="rt-store-bench-")))
        if not grouped:
            store.messages._max_batch = 1
    else:
        uri = os.environ.get("MONGODB_URI")
        if not uri:
            raise SystemExit("--backend mongodb needs MONGODB_URI (a real MongoDB)")
        store = MongoStore(uri, f"rt_bench_{int(time.time())}")  # type: ignore[assignment]
    await store.open()
    latencies: list[float] = []
    per = max(1, messages // publishers)

    async def publisher(i: int) -> None:
        for k in range(per):
            t = time.perf_counter()
            await store.messages.append(
                f"room:bench{i}", f"u{i}", "d1", f"m{k}", ENVELOPE, int(time.time() * 1000)
            )
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(publisher(i) for i in range(publishers)))
    elapsed = time.perf_counter() - t0
    batches = getattr(store.messages, "batches", None)
    await store.close()
    return StoreResult(
        backend,
        grouped,
        publishers,
        per * publishers,
        round(per * publishers / elapsed, 1),
        _pct(latencies, 50),
        _pct(latencies, 99),
        batches,
    )


def run(backend: str, publishers: list[int], messages: int) -> list[StoreResult]:
    results = []
    for grouped in (False, True) if backend == "sqlite" else (True,):
        for n in publishers:
            results.append(asyncio.run(_run_one(backend, grouped, n, messages)))
    return results


def report(results: list[StoreResult]) -> str:
    head = "| backend | grouped | publishers | appends/s | p50 ms | p99 ms | transactions |"
    rows = [
        f"| {r.backend} | {r.grouped} | {r.publishers} | {r.appends_per_s} | "
        f"{r.latency_ms_p50} | {r.latency_ms_p99} | {r.transactions} |"
        for r in results
    ]
    return "\n".join([head, "|---|---|---|---|---|---|---|", *rows]) + "\n"


def as_dicts(results: list[StoreResult]) -> list[dict[str, object]]:
    return [asdict(r) for r in results]
