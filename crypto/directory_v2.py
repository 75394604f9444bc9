"""The v2 key directory on the server (docs/e2ee/server.md): user keys, device certificates
and revocations, each appended to the transparency log; one-time keys. Records live in
`store.records` under the layout of docs/e2ee/server.md."""

from __future__ import annotations

from realtime_safety.storage import DocStore

from .identity import VerifiedDevice


async def certified_device(records: DocStore, user: str, device: str) -> VerifiedDevice | None:
    """`user`'s device `device` if a certificate for it was accepted and it is not revoked."""
    doc = await records.get("dir.device", f"{user}|{device}")
    if doc is None or doc.get("revoked"):
        return None
    cert = doc["cert"]
    return VerifiedDevice(user, device, doc["ed25519"], doc["curve25519"], cert["created_ms"])
