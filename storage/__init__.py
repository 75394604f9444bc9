"""Persistence of channel history, sequences, idempotency, memberships and read markers.

Offers:
- the interfaces `Store`, `MessageStore`, `MembershipStore`, `ReadMarkerStore`, `KeyStore`
  (device keys and sealed channel keys), `ReportStore` and the records `Message`, `Appended`,
  `Device`, `Report` (`storage.base`);
- `SqliteStore`, the embedded single-node store (`storage.sqlite`);
- `MongoStore`, the shared multi-node store on `pymongo.AsyncMongoClient` (`storage.mongo`);
- `StoreConfig` and `open_store(config)`, which picks one (the server hands its settings
  down as a `StoreConfig`; nothing here reads the server's configuration).

The server stores message bodies exactly as clients send them: end-to-end encrypted envelopes
(ciphertext only) except in namespaces configured for plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import (
    RECORD_KINDS,
    Appended,
    Device,
    DeviceRef,
    DocStore,
    KeyStore,
    MembershipStore,
    Message,
    MessageStore,
    ReadMarkerStore,
    Report,
    ReportStore,
    Store,
    StoreUnavailable,
)

__all__ = [
    "RECORD_KINDS",
    "Appended",
    "Device",
    "DeviceRef",
    "DocStore",
    "KeyStore",
    "MembershipStore",
    "Message",
    "MessageStore",
    "ReadMarkerStore",
    "Report",
    "ReportStore",
    "Store",
    "StoreConfig",
    "StoreUnavailable",
    "open_store",
]


@dataclass(frozen=True)
class StoreConfig:
    data_dir: Path  # the embedded store's directory (SQLite), used without mongodb_uri
    mongodb_uri: str | None = None
    mongodb_db: str = "realtime"
    timeout_s: float = 5.0
    write_concern: str | int = "majority"
    journal: bool = True


def open_store(config: StoreConfig) -> Store:
    """MongoDB when a URI is given, else the embedded store (not yet opened: call
    `await store.open()`)."""
    if config.mongodb_uri:
        from .mongo import MongoStore

        return MongoStore(
            config.mongodb_uri,
            config.mongodb_db,
            timeout_s=config.timeout_s,
            write_concern=config.write_concern,
            journal=config.journal,
        )
    from .sqlite import SqliteStore

    return SqliteStore(config.data_dir)
