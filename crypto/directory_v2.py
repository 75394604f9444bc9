"""The v2 key directory on the server (docs/e2ee/server.md): user keys, device certificates
and revocations, each appended to the transparency log; one-time keys. Records live in
`store.records` under the layout of docs/e2ee/server.md.

Every check that needs no store runs before anything is written, so a refused publish appends
nothing. The log is written first and the directory's records after it: a node that stops in
between leaves an entry the directory does not show (clients take the log as the truth and
the owner sees the entry), never a directory record that is not in the log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from realtime_safety.protocol import ProtocolError
from realtime_safety.storage import DocStore

from .e2ee import CryptoError, pack
from .identity import (
    DeviceCertificate,
    Revocation,
    UserKeyStatement,
    VerifiedDevice,
    verify_certificate,
    verify_revocation,
    verify_user_key,
)
from .keylog import KeyLog

MAX_OTK_HELD = 100  # one-time keys waiting per device
CLAIM_PAGE = 8  # one-time keys read at once by a claim (several nodes may race for them)
DELETE_PAGE = 100


async def certified_device(records: DocStore, user: str, device: str) -> VerifiedDevice | None:
    """`user`'s device `device` if a certificate for it was accepted and it is not revoked."""
    doc = await records.get("dir.device", f"{user}|{device}")
    if doc is None or doc.get("revoked"):
        return None
    cert = doc["cert"]
    return VerifiedDevice(user, device, doc["ed25519"], doc["curve25519"], cert["created_ms"])


def valid_device_id(device: object) -> bool:
    """1-64 characters without '|' (the records' keys are `<user>|<device>|...`)."""
    return isinstance(device, str) and 1 <= len(device) <= 64 and "|" not in device


def packed(wire: dict[str, Any]) -> bytes:
    """A wire object as a log entry's payload."""
    return pack(wire)


@dataclass(frozen=True)
class Published:
    user_index: int
    device_index: int
    one_time_keys: int  # held by the device now


class DirectoryV2:
    def __init__(self, records: DocStore, log: KeyLog) -> None:
        self._records = records
        self.log = log

    # --- publish --------------------------------------------------------------------------

    async def publish(
        self, st: UserKeyStatement, cert: DeviceCertificate, otks: dict[str, bytes]
    ) -> Published:
        """The caller is `st.user` and `cert.user` (checked by the op)."""
        try:
            verify_user_key(st)
        except CryptoError as err:
            raise ProtocolError("forbidden", f"user key: {err}") from None
        try:
            verify_certificate(cert, st.user_pub)
        except CryptoError as err:
            raise ProtocolError("forbidden", f"device certificate: {err}") from None
        user, key = st.user, f"{st.user}|{cert.device}"
        current = await self._records.get("dir.user", user)
        stored = await self._records.get("dir.device", key)
        wire = cert.to_wire()
        if stored is not None:
            _check_reuse(stored, cert, wire, st.user_pub)
        if current is not None and current["user_pub"] == st.user_pub:
            user_index = int(current["index"])
        else:  # first key, rotation or reset: all three are appended (clients tell them apart)
            user_index = await self.log.append("user-key", user, packed(st.to_wire()))
            await self._set_user_key(user, st.user_pub, user_index)
        if stored is not None and stored["cert"] == wire:
            device_index = int(stored["index"])
        else:
            device_index = await self._add_device(key, cert, wire, stored, st.user_pub)
        held = await self._store_otks(key, otks)
        return Published(user_index, device_index, held)

    async def _set_user_key(self, user: str, user_pub: bytes, index: int) -> None:
        """dir.user follows the log: the user-key entry with the greatest index is current."""
        doc = {"user_pub": user_pub, "index": index}
        while True:
            current = await self._records.get("dir.user", user)
            if current is None:
                if await self._records.insert("dir.user", user, doc) is None:
                    return
                continue
            if current["index"] >= index:
                return  # a later entry (another node's) is current already
            if await self._records.put("dir.user", user, doc, version=current["_v"]):
                return

    async def _add_device(
        self,
        key: str,
        cert: DeviceCertificate,
        wire: dict[str, Any],
        stored: dict[str, Any] | None,
        user_pub: bytes,
    ) -> int:
        index = await self.log.append("device", cert.user, packed(wire))
        doc = {
            "cert": wire,
            "ed25519": cert.ed25519,
            "curve25519": cert.curve25519,
            "index": index,
            "revoked": False,
        }
        while True:
            if stored is None:
                stored = await self._records.insert("dir.device", key, doc)
                if stored is None:
                    return index
            elif await self._records.put("dir.device", key, doc, version=stored["_v"]):
                return index
            else:
                stored = await self._records.get("dir.device", key)
                assert stored is not None
            # another publish of this device got there first (its entry is in the log too)
            if stored["cert"] == wire:
                return int(stored["index"])
            _check_reuse(stored, cert, wire, user_pub)

    async def _store_otks(self, key: str, otks: dict[str, bytes]) -> int:
        held = len(await self._records.prefix("otk", key + "|", MAX_OTK_HELD))
        for key_id, value in sorted(otks.items()):
            if held >= MAX_OTK_HELD:
                break
            doc = {"key_id": key_id, "key": value}
            if await self._records.insert("otk", f"{key}|{key_id}", doc) is None:
                held += 1
        return held

    # --- claim ----------------------------------------------------------------------------

    async def claim(self, devices: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """One one-time key for each certified, unrevoked device that has one left."""
        out = []
        for user, device in devices:
            if await certified_device(self._records, user, device) is None:
                continue
            found = await self._claim_one(f"{user}|{device}")
            if found is not None:
                out.append({"user": user, "device": device, **found})
        return out

    async def _claim_one(self, key: str) -> dict[str, Any] | None:
        while True:
            docs = await self._records.prefix("otk", key + "|", CLAIM_PAGE)
            if not docs:
                return None
            for doc in docs:
                if await self._records.delete("otk", f"{key}|{doc['key_id']}"):
                    return {"key_id": doc["key_id"], "key": doc["key"]}
            # every one of them went to another claim meanwhile: read the next ones

    # --- revoke ---------------------------------------------------------------------------

    async def revoke(self, rev: Revocation) -> int:
        """The caller is `rev.user` (checked by the op). Returns the revoke entry's index."""
        key = f"{rev.user}|{rev.device}"
        stored = await self._records.get("dir.device", key)
        current = await self._records.get("dir.user", rev.user)
        if stored is None or current is None:
            raise ProtocolError("not_found", f"{rev.user!r} has no device {rev.device!r}")
        try:
            verify_revocation(rev, current["user_pub"], stored["ed25519"])
        except CryptoError as err:
            raise ProtocolError("forbidden", f"revocation: {err}") from None
        if stored.get("revoked"):
            return int(stored["revoke_index"])  # revoked already: nothing more to log
        index = await self.log.append("revoke", rev.user, packed(rev.to_wire()))
        while True:
            doc = {**stored, "revoked": True, "revoke_index": index}
            if await self._records.put("dir.device", key, doc, version=stored["_v"]):
                break
            stored = await self._records.get("dir.device", key)
            assert stored is not None
            if stored.get("revoked"):
                break  # revoked meanwhile by another node
        await self._delete_prefix("otk", key + "|", lambda doc: f"{key}|{doc['key_id']}")
        await self._delete_prefix("todevice", key + "|", lambda doc: _todevice_key(key, doc))
        return index

    async def _delete_prefix(self, coll: str, prefix: str, key_of: Any) -> None:
        while True:
            docs = await self._records.prefix(coll, prefix, DELETE_PAGE)
            deleted = [await self._records.delete(coll, key_of(doc)) for doc in docs]
            if len(docs) < DELETE_PAGE or not any(deleted):
                return


def _todevice_key(device_key: str, doc: dict[str, Any]) -> str:
    """A `todevice` record's key from its document: `id` is the key, or its part after
    `<user>|<device>|`."""
    ident = str(doc.get("id"))
    return ident if ident.startswith(device_key + "|") else f"{device_key}|{ident}"


def _check_reuse(
    stored: dict[str, Any], cert: DeviceCertificate, wire: dict[str, Any], user_pub: bytes
) -> None:
    """`conflict` when a device id is used again: revoked, certified for other device keys, or
    another certificate under the same user key. A certificate of the same device keys under a
    new user key (after a rotation or a reset) is the device certified again: accepted."""
    if stored.get("revoked"):
        raise ProtocolError("conflict", f"device {cert.device!r} is revoked; use a new device id")
    if stored["cert"] == wire:
        return
    if (stored["ed25519"], stored["curve25519"]) != (cert.ed25519, cert.curve25519):
        raise ProtocolError("conflict", f"device {cert.device!r} is certified with other keys")
    try:
        verify_certificate(DeviceCertificate.from_wire(stored["cert"]), user_pub)
    except CryptoError:
        return  # the stored certificate is under an earlier user key
    raise ProtocolError("conflict", f"device {cert.device!r} has another certificate")
