"""The embedded store's messages: gap-free seqs, group commit, idempotency, retention."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from typing import Any

import msgpack

from .base import Appended, Message, StoreUnavailable
from .sqlite_db import Db, transaction

COLUMNS = "channel, seq, ts, user, device, client_msg_id, body"
_LAST_SEQ = (
    "SELECT MAX(COALESCE((SELECT MAX(seq) FROM messages WHERE channel=?1), 0),"
    " COALESCE((SELECT last_seq FROM channel_heads WHERE channel=?1), 0))"
)


def _row(row: tuple[Any, ...]) -> Message:
    channel, seq, ts, user, device, cmid, body = row
    return Message(channel, seq, ts, user, device, cmid, msgpack.unpackb(body, raw=False))


def _namespace_range(namespace: str) -> tuple[str, str]:
    """Channel names of a namespace sort between `ns:` and `ns;` (';' follows ':')."""
    return f"{namespace}:", f"{namespace};"


@dataclass(slots=True)
class _Pending:
    channel: str
    user: str
    device: str | None
    client_msg_id: str
    body: dict[str, Any]
    blob: bytes
    ts: int
    future: asyncio.Future[Appended]


RELEASE = 32  # appends whose callers go on in one turn of the event loop


class SqliteMessages:
    def __init__(self, writer: Db, reader: Db, max_batch: int = 256) -> None:
        self._w = writer
        self._r = reader
        self._queue: list[_Pending] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None  # owned; ends when the queue is empty
        self._max_batch = max_batch
        self.batches = 0  # group commits made (for the storage benchmark)

    async def append(
        self,
        channel: str,
        user: str,
        device: str | None,
        client_msg_id: str,
        body: dict[str, Any],
        ts: int,
    ) -> Appended:
        loop = asyncio.get_running_loop()
        blob = msgpack.packb(body, use_bin_type=True)
        pending = _Pending(
            channel, user, device, client_msg_id, body, blob, ts, loop.create_future()
        )
        self._queue.append(pending)
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush(), name="sqlite-group-commit")
        return await asyncio.shield(pending.future)

    async def _flush(self) -> None:
        """Commit queued appends in groups until the queue is empty."""
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                try:
                    results = await self._w.run(lambda db, b=batch: self._commit(db, b))  # type: ignore[misc]
                except BaseException as exc:
                    error = exc if isinstance(exc, Exception) else StoreUnavailable(repr(exc))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self.batches += 1
                # The publishes a batch completes go on (fan-out, replies) a few at a time, a
                # turn of the event loop each: all at once, one turn would hold up every
                # socket's reads (an SOS too) for as long as 256 fan-outs take.
                for i, (p, result) in enumerate(zip(batch, results, strict=True)):
                    if i and not i % RELEASE:
                        await asyncio.sleep(0)
                    if not p.future.done():
                        p.future.set_result(result)
        finally:
            self._flushing = False

    def _commit(self, db: sqlite3.Connection, batch: list[_Pending]) -> list[Appended]:
        def work() -> list[Appended]:
            results = []
            for p in batch:
                found = db.execute(
                    f"SELECT {COLUMNS} FROM messages "
                    "WHERE channel=? AND user=? AND client_msg_id=?",
                    (p.channel, p.user, p.client_msg_id),
                ).fetchone()
                if found:
                    results.append(Appended(_row(found), duplicate=True))
                    continue
                (last,) = db.execute(_LAST_SEQ, (p.channel,)).fetchone()
                seq = last + 1
                db.execute(
                    f"INSERT INTO messages ({COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                    (p.channel, seq, p.ts, p.user, p.device, p.client_msg_id, p.blob),
                )
                message = Message(p.channel, seq, p.ts, p.user, p.device, p.client_msg_id, p.body)
                results.append(Appended(message, duplicate=False))
            return results

        return transaction(db, work)

    async def last_seq(self, channel: str) -> int:
        return await self._r.run(lambda db: int(db.execute(_LAST_SEQ, (channel,)).fetchone()[0]))

    async def after(self, channel: str, after_seq: int, limit: int) -> list[Message]:
        def q(db: sqlite3.Connection) -> list[Message]:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM messages WHERE channel=? AND seq>? ORDER BY seq LIMIT ?",
                (channel, after_seq, limit),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self._r.run(q)

    async def before(self, channel: str, before_seq: int | None, limit: int) -> list[Message]:
        bound = before_seq if before_seq is not None else 2**62

        def q(db: sqlite3.Connection) -> list[Message]:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM messages WHERE channel=? AND seq<? "
                "ORDER BY seq DESC LIMIT ?",
                (channel, bound, limit),
            ).fetchall()
            return [_row(r) for r in reversed(rows)]

        return await self._r.run(q)

    async def redact(self, channel: str, seq: int, tombstone: dict[str, Any]) -> bool:
        blob = msgpack.packb(tombstone, use_bin_type=True)

        def q(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE messages SET body=? WHERE channel=? AND seq=?", (blob, channel, seq)
            )
            return cur.rowcount == 1

        return await self._w.run(q)

    async def purge(self, namespace: str, before_ts: int) -> int:
        low, high = _namespace_range(namespace)

        def q(db: sqlite3.Connection) -> int:
            def work() -> int:
                # Remember each channel's highest seq first, so that seqs are never reused
                # even when every message of a channel has expired.
                db.execute(
                    "INSERT INTO channel_heads (channel, last_seq) "
                    "SELECT channel, MAX(seq) FROM messages "
                    "WHERE channel>=? AND channel<? AND ts<? GROUP BY channel "
                    "ON CONFLICT (channel) DO UPDATE "
                    "SET last_seq=MAX(last_seq, excluded.last_seq)",
                    (low, high, before_ts),
                )
                cur = db.execute(
                    "DELETE FROM messages WHERE channel>=? AND channel<? AND ts<?",
                    (low, high, before_ts),
                )
                return cur.rowcount

            return transaction(db, work)

        return await self._w.run(q)
