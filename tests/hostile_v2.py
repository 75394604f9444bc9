"""The hostile operator's tools against E2EE v2 (tests/test_hostile_server.py).

The operator runs the server, so it holds the key log's signing key (`hostile.LOG_SEED`, the
node is started with it) and can answer any request itself:

- `Operator.forge(victim, *entries)`: from now on `victim`'s `keys.query` and
  `keys.consistency` answers come from a log of the operator's making: the real log with
  `entries` inserted where it stood when forging began, later real entries appended after
  them. The victim's view stays append-only and consistent with every head it saw before (a
  split view): only comparing heads with someone on the real log can reveal it.
- `Operator.hide(victim, index)`: `victim`'s per-user lists leave out the real entry `index`
  (the log and its heads stay the real ones: no signing key needed).
- `forged_device` / `forged_user_key`: log entries for a device certificate or a user key
  that the attacker signed (it has no honest user's key).
- `offer_device`: one-time keys for attacker devices in the victim's `keys.claim` answers, and
  the victim's to-device messages to them taken out of `todevice.send` before the node sees
  them (it would refuse the batch); they stay in the proxy's log, where the attacker reads them.
- `stolen_session_keys`: the Megolm session keys in every to-device message the proxy saw for
  one device, opened with that device's Olm state (the attacker's own, or a stolen one).
- `megolm_reads`: the texts of a channel's published v2 envelopes that Megolm sessions open.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack
import vodozemac
from conftest import Node, token
from hostile import LOG_SEED, Frame, Hit, HostileProxy, unique
from nacl.signing import SigningKey
from wire import Raw

from realtime_safety.crypto.e2ee import CryptoError, pack
from realtime_safety.crypto.envelope import ALG, DeviceAccount, InboundSessions, Olm, b64_encode
from realtime_safety.crypto.envelope_megolm import _parse_share
from realtime_safety.crypto.merkle import MerkleLog
from realtime_safety.crypto.transparency import SignedTreeHead, entry, parse_entry, sign_head
from realtime_safety.crypto.user_keys import UserKeys

MSGPACK = "rt.v1.msgpack"


def now_ms() -> int:
    return int(time.time() * 1000)


def forged_user_key(keys: UserKeys) -> bytes:
    """A `user-key` log entry announcing `keys` (the attacker's) as its user's key: a reset."""
    return entry("user-key", keys.user, pack(keys.announce(now_ms()).to_wire()), now_ms())


def forged_device(keys: UserKeys, account: DeviceAccount) -> bytes:
    """A `device` log entry certifying `account` under `keys` (for `keys.user`)."""
    cert = keys.certify_account(account.olm_account, account.device, now_ms())
    return entry("device", keys.user, pack(cert.to_wire()), now_ms())


@dataclass
class _View:
    at: int  # real index the forged entries stand at
    extra: list[bytes] = field(default_factory=list)
    hidden: set[int] = field(default_factory=set)  # real indices left out of user lists


class Operator:
    def __init__(self, node: Node, proxy: HostileProxy) -> None:
        self.node = node
        self.proxy = proxy
        self.key = SigningKey(LOG_SEED)
        self._raw: Raw | None = None
        self._real: list[bytes] = []
        self._views: dict[str, _View] = {}

    async def raw(self) -> Raw:
        """The operator's own connection to the node (an ordinary account)."""
        if self._raw is None:
            self._raw = await Raw.open(self.node.url, token(unique("operator")), proto=MSGPACK)
        return self._raw

    async def close(self) -> None:
        if self._raw is not None:
            await self._raw.close()

    async def real_log(self) -> list[bytes]:
        raw = await self.raw()
        size = SignedTreeHead.from_wire((await raw.ok("keys.log", start=0, end=0))["sth"]).size
        while len(self._real) < size:
            end = min(size, len(self._real) + 1000)
            self._real += (await raw.ok("keys.log", start=len(self._real), end=end))["entries"]
        return self._real

    async def _view(self, victim: str) -> _View:
        if victim not in self._views:
            self._views[victim] = _View(len(await self.real_log()))
            self.proxy.on_reply("keys.query", self._query, user=victim)
            self.proxy.on_reply("keys.consistency", self._consistency, user=victim)
        return self._views[victim]

    async def forge(self, victim: str, *entries: bytes) -> None:
        (await self._view(victim)).extra.extend(entries)

    async def hide(self, victim: str, kind: str, user: str) -> None:
        """Leave `user`'s real entries of `kind` out of `victim`'s answers."""
        view = await self._view(victim)
        for i, data in enumerate(await self.real_log()):
            parsed = parse_entry(data)
            if (parsed.kind, parsed.user) == (kind, user):
                view.hidden.add(i)

    async def _leaves(self, victim: str) -> tuple[list[bytes], set[int]]:
        view, real = self._views[victim], await self.real_log()
        hidden = {i if i < view.at else i + len(view.extra) for i in view.hidden}
        return real[: view.at] + view.extra + real[view.at :], hidden

    def _log(self, leaves: list[bytes]) -> MerkleLog:
        log = MerkleLog()
        for data in leaves:
            log.append(data)
        return log

    async def _query(self, reply: Frame, hit: Hit) -> Frame:
        if not reply.get("ok") or hit.user is None:
            return reply
        request = hit.request or {}
        leaves, hidden = await self._leaves(hit.user)
        log = self._log(leaves)
        size = log.size
        head = sign_head(self.key, size, log.root(), now_ms()).to_wire()
        since = request.get("since")
        users = {
            u: [
                {"index": i, "entry": data, "proof": log.inclusion(i, size)}
                for i, data in enumerate(leaves)
                if parse_entry(data).user == u and i not in hidden
            ]
            for u in request.get("users", [])
        }
        consistency = log.consistency(since, size) if since else []
        return {**reply, "sth": head, "consistency": consistency, "users": users}

    async def _consistency(self, reply: Frame, hit: Hit) -> Frame:
        request = hit.request or {}
        assert hit.user is not None
        log = self._log((await self._leaves(hit.user))[0])
        try:
            proof = log.consistency(request["first"], request["second"])
        except (ValueError, IndexError):
            return reply
        return {"id": reply["id"], "ok": True, "proof": proof}


def offer_device(proxy: HostileProxy, viewer: str, user: str, account: DeviceAccount) -> None:
    """`viewer` may claim a one-time key of the attacker's `account` as `user`'s device; what
    `viewer` then sends to that device is taken out before the node sees it (kept in the log)."""

    def claim(reply: Frame, hit: Hit) -> Frame:
        asked = (hit.request or {}).get("devices", [])
        if not reply.get("ok") or {"user": user, "device": account.device} not in asked:
            return reply
        key_id, key = next(iter(account.new_one_time_keys(1).items()))
        keys = [k for k in reply["keys"] if (k["user"], k["device"]) != (user, account.device)]
        mine = {"user": user, "device": account.device, "key_id": key_id, "key": key}
        return {**reply, "keys": [*keys, mine]}

    def strip(request: Frame, _hit: Hit) -> Frame | None:
        kept = [
            m
            for m in request.get("messages", [])
            if (m.get("user"), m.get("device")) != (user, account.device)
        ]
        return {**request, "messages": kept} if kept else {"id": request.get("id"), "op": "ping"}

    proxy.on_reply("keys.claim", claim, user=viewer)
    proxy.on_request("todevice.send", strip, user=viewer)


def published(proxy: HostileProxy, user: str, device: str) -> Frame:
    """The device certificate (wire) `user` published for `device`, as the proxy saw it."""
    for frame in proxy.requests("keys.publish", user=user):
        cert = frame.get("device") or {}
        if cert.get("device") == device:
            return dict(cert)
    raise KeyError((user, device))


def stolen_session_keys(
    proxy: HostileProxy, user: str, account: DeviceAccount, olm: Olm | None = None
) -> list[bytes]:
    """Megolm session keys from every to-device message for (`user`, `account.device`) that the
    proxy saw sent, opened with `olm` (default: a fresh Olm state of `account`)."""
    olm = olm or Olm(account)
    found: list[bytes] = []
    for seen in proxy.seen("request", "todevice.send"):
        sender, request = seen.user, seen.original
        for message in request.get("messages", []):
            if (message.get("user"), message.get("device")) != (user, account.device):
                continue
            try:
                assert sender is not None
                curve = published(proxy, sender, request["device"])["curve25519"]
                plain = olm.decrypt(
                    sender, request["device"], curve, message["type"], message["ct"]
                )
                statement = msgpack.unpackb(plain.plaintext)["statement"]
                found.append(_parse_share(statement).session_key)
            except (CryptoError, KeyError, TypeError, ValueError, AssertionError):
                continue
    return found


def sessions_of(
    keys: Iterable[bytes] = (), inbound: InboundSessions | None = None
) -> list[vodozemac.InboundGroupSession]:
    """Megolm sessions from raw session keys and from a (stolen) `InboundSessions`."""
    found = [vodozemac.InboundGroupSession(vodozemac.SessionKey(b64_encode(k))) for k in keys]
    if inbound is not None:
        found += [held.session for held in inbound._sessions.values()]
    return found


def megolm_reads(
    proxy: HostileProxy,
    channel: str,
    sessions: list[vodozemac.InboundGroupSession],
    *,
    since: int = 0,
) -> list[str]:
    """The texts of `channel`'s v2 envelopes (as published) that `sessions` open."""
    read: list[str] = []
    for seen in proxy.seen("request", "publish", since=since):
        frame = seen.original
        body = frame.get("body") or {}
        if frame.get("channel") != channel or body.get("alg") != ALG:
            continue
        for session in sessions:
            try:
                opened = session.decrypt(vodozemac.MegolmMessage.from_bytes(body["mm"]))
                read.append(msgpack.unpackb(opened.plaintext)["text"])
                break
            except (vodozemac.MegolmDecryptionException, vodozemac.DecodeException, ValueError):
                continue
            except (KeyError, TypeError):
                continue
    return read
