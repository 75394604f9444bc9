"""The v2 key directory's ops (docs/e2ee/server.md, "Directory"): keys.publish, keys.query,
keys.claim, keys.revoke, keys.log and keys.consistency. Everything handed out is signed by a
user or device key and comes with a proof from the transparency log; the server checks it all
before storing it all the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from realtime_safety.protocol import (
    Codec,
    Feature,
    ProtocolError,
    Reply,
    Session,
    arg_int,
    valid_user_id,
)
from realtime_safety.storage import DocStore

from .directory_v2 import MAX_OTK_HELD, DirectoryV2, valid_device_id
from .e2ee import CryptoError
from .identity import DeviceCertificate, Revocation, UserKeyStatement
from .keylog import KeyLog

T = TypeVar("T")

MAX_USERS = 100
MAX_DEVICES = 100
MAX_LOG_ENTRIES = 1000
MAX_SIZE = 2**63 - 1

USER_KEY_BYTES = ("user_pub", "previous", "sig", "previous_sig")
CERT_BYTES = ("ed25519", "curve25519", "user_sig", "device_sig")
REVOCATION_BYTES = ("sig",)


def _wire(codec: Codec, value: object, name: str, byte_fields: tuple[str, ...]) -> dict[str, Any]:
    """A wire object as received: its byte fields raw (msgpack) or base64 (JSON)."""
    if not isinstance(value, dict):
        raise ProtocolError("bad_request", f"'{name}' must be a map")
    out = dict(value)
    for field in byte_fields:
        if field in out:
            data = codec.bytes_field(out[field])
            if data is None:
                raise ProtocolError("bad_request", f"'{name}.{field}' must be bytes")
            out[field] = data
    return out


def _parsed(parse: Callable[[dict[str, Any]], T], wire: dict[str, Any], name: str) -> T:
    try:
        return parse(wire)
    except CryptoError as err:
        raise ProtocolError("bad_request", f"'{name}': {err}") from None


def _one_time_keys(codec: Codec, value: object) -> dict[str, bytes]:
    shape = f"'one_time_keys' must map up to {MAX_OTK_HELD} key ids (1-64 characters) to 32 bytes"
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_OTK_HELD:
        raise ProtocolError("bad_request", shape)
    out: dict[str, bytes] = {}
    for key_id, key in value.items():
        data = codec.bytes_field(key)
        if not isinstance(key_id, str) or not 1 <= len(key_id) <= 64 or data is None:
            raise ProtocolError("bad_request", shape)
        if len(data) != 32:
            raise ProtocolError("bad_request", shape)
        out[key_id] = data
    return out


def _size(frame: dict[str, Any], name: str, *, required: bool = True) -> int | None:
    value = arg_int(frame, name, maximum=MAX_SIZE)
    if value is None and required:
        raise ProtocolError("bad_request", f"'{name}' is required")
    return value


class DirectoryOps(Feature):
    def __init__(self, records: DocStore, signing_seed: bytes | None = None) -> None:
        self.log = KeyLog(records, signing_seed)
        self.directory = DirectoryV2(records, self.log)
        self.ops = {
            "keys.publish": self.publish,
            "keys.query": self.query,
            "keys.claim": self.claim,
            "keys.revoke": self.revoke,
            "keys.log": self.entries,
            "keys.consistency": self.consistency,
        }

    async def publish(self, session: Session, frame: dict[str, Any]) -> Reply:
        codec, user = session.codec, session.identity.user
        st: UserKeyStatement = _parsed(
            UserKeyStatement.from_wire,
            _wire(codec, frame.get("user_key"), "user_key", USER_KEY_BYTES),
            "user_key",
        )
        cert: DeviceCertificate = _parsed(
            DeviceCertificate.from_wire,
            _wire(codec, frame.get("device"), "device", CERT_BYTES),
            "device",
        )
        otks = _one_time_keys(codec, frame.get("one_time_keys"))
        if st.user != user or cert.user != user:
            raise ProtocolError("forbidden", "you may publish only your own keys")
        if not valid_device_id(cert.device):
            raise ProtocolError("bad_request", "a device id is 1-64 characters without '|'")
        done = await session.bounded(self.directory.publish(st, cert, otks))
        sth = await session.bounded(self.log.head())
        return {
            "user_index": done.user_index,
            "device_index": done.device_index,
            "one_time_keys": done.one_time_keys,
            "sth": sth.to_wire(),
        }

    async def query(self, session: Session, frame: dict[str, Any]) -> Reply:
        users = frame.get("users")
        if (
            not isinstance(users, list)
            or not 1 <= len(users) <= MAX_USERS
            or not all(valid_user_id(u) for u in users)
        ):
            raise ProtocolError("bad_request", f"'users' must be a list of 1-{MAX_USERS} user ids")
        since = _size(frame, "since", required=False)
        sth = await session.bounded(self.log.head())
        if since is not None and since > sth.size:
            raise ProtocolError("bad_request", f"'since' is beyond the log's size {sth.size}")
        found: dict[str, list[dict[str, Any]]] = {}
        for user in users:
            found[user] = [
                {
                    "index": index,
                    "entry": await session.bounded(self.log.entry(index)),
                    "proof": self.log.inclusion(index, sth.size),
                }
                for index in self.log.indices(user, sth.size)
            ]
        key = await session.bounded(self.log.signing_key())
        return {
            "sth": sth.to_wire(),
            "consistency": [] if not since else self.log.consistency(since, sth.size),
            "users": found,
            "log_key": bytes(key.verify_key),  # for a client not configured with it (TOFU)
        }

    async def claim(self, session: Session, frame: dict[str, Any]) -> Reply:
        shape = f"'devices' must be a list of 1-{MAX_DEVICES} {{user, device}}"
        devices = frame.get("devices")
        if not isinstance(devices, list) or not 1 <= len(devices) <= MAX_DEVICES:
            raise ProtocolError("bad_request", shape)
        wanted = []
        for item in devices:
            if not isinstance(item, dict):
                raise ProtocolError("bad_request", shape)
            user, device = item.get("user"), item.get("device")
            if not valid_user_id(user) or not valid_device_id(device):
                raise ProtocolError("bad_request", shape)
            assert isinstance(user, str) and isinstance(device, str)
            wanted.append((user, device))
        keys = await session.bounded(self.directory.claim(wanted))
        return {"keys": keys}

    async def revoke(self, session: Session, frame: dict[str, Any]) -> Reply:
        rev: Revocation = _parsed(
            Revocation.from_wire,
            _wire(session.codec, frame.get("revocation"), "revocation", REVOCATION_BYTES),
            "revocation",
        )
        if rev.user != session.identity.user:
            raise ProtocolError("forbidden", "you may revoke only your own devices")
        index = await session.bounded(self.directory.revoke(rev))
        sth = await session.bounded(self.log.head())
        return {"index": index, "sth": sth.to_wire()}

    async def entries(self, session: Session, frame: dict[str, Any]) -> Reply:
        """keys.log: the raw entries [start, end), and the frontier at the head's size (what a
        new device needs to start scanning there: `LogMonitor.start_scan`)."""
        start, end = _size(frame, "start"), _size(frame, "end")
        assert start is not None and end is not None
        sth = await session.bounded(self.log.head())
        if not start <= end <= sth.size or end - start > MAX_LOG_ENTRIES:
            raise ProtocolError(
                "bad_request",
                f"need start <= end <= {sth.size} (the log's size), "
                f"at most {MAX_LOG_ENTRIES} entries",
            )
        return {
            "entries": await session.bounded(self.log.entries(start, end)),
            "sth": sth.to_wire(),
            "frontier": self.log.frontier(sth.size),
        }

    async def consistency(self, session: Session, frame: dict[str, Any]) -> Reply:
        first, second = _size(frame, "first"), _size(frame, "second")
        assert first is not None and second is not None
        size = await session.bounded(self.log.sync())
        if not 0 < first <= second <= size:
            raise ProtocolError("bad_request", f"need 0 < first <= second <= {size} (the size)")
        return {"proof": self.log.consistency(first, second)}
