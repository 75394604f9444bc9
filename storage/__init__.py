"""Persistence of channel history, sequences, idempotency, memberships and read markers.

Offers:
- the interfaces `Store`, `MessageStore`, `MembershipStore`, `ReadMarkerStore`, `KeyStore`
  (device keys and sealed channel keys), `ReportStore` and the records `Message`, `Appended`,
  `Device`, `Report` (`storage.base`);
- `SqliteStore`, the embedded single-node store (`storage.sqlite`);
- `MongoStore`, the shared multi-node store on `pymongo.AsyncMongoClient` (`storage.mongo`);
- `open_store(settings)`, which picks one from the configuration.

The server stores message bodies exactly as clients send them: end-to-end encrypted envelopes
(ciphertext only) except in namespaces configured for plaintext.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    RECORD_KINDS,
    Appended,
    Device,
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

if TYPE_CHECKING:
    from realtime.config import Settings

__all__ = [
    "RECORD_KINDS",
    "Appended",
    "Device",
    "DocStore",
    "KeyStore",
    "MembershipStore",
    "Message",
    "MessageStore",
    "ReadMarkerStore",
    "Report",
    "ReportStore",
    "Store",
    "StoreUnavailable",
    "open_store",
]


def open_store(settings: Settings) -> Store:
    """The store the configuration asks for (not yet opened: call `await store.open()`)."""
    if settings.mongodb_uri:
        from .mongo import MongoStore

        return MongoStore(
            settings.mongodb_uri,
            settings.mongodb_db,
            timeout_s=settings.store_timeout_s,
            write_concern=settings.mongodb_write_concern,
            journal=settings.mongodb_journal,
        )
    from .sqlite import SqliteStore

    return SqliteStore(settings.data_dir)
