"""End-to-end encryption v2: Megolm messages signed by the sender device, Megolm keys handed
out in signed key shares over Olm (docs/e2ee/messages.md; decision docs/decisions/0001-e2ee-v2.md).

The ratchets are vodozemac's (Olm: `Account`/`Session`; Megolm: `GroupSession` /
`InboundGroupSession`); what they do not say -- which device sent a message, for which channel,
`client_msg_id` and time, to whom a key was given and under which membership epoch -- is said by
our own statements: msgpack arrays with an `rt.v2.*` domain tag and a detached Ed25519 signature
by the sender *device* (verified with PyNaCl against a key the identity layer verified).

- `DeviceAccount`: a device's Olm account (Ed25519 + Curve25519 identity keys, one-time keys),
  saved encrypted under a passphrase (Argon2id).
- `Olm`: the pairwise channels of one device, kept per (user, device); carries key shares only.
- `make_share` / `open_share`: the signed key-share statement for one recipient device.
- `OutboundSession` / `InboundSessions`: Megolm sessions, with rotation and deletion rules.
- `encrypt_v2` / `decrypt_v2` / `server_verify_v2`: the v2 envelope.
- `ReplayGuard`: drops a message seen before under another place in the history.
- `classify` / `open_v1`: refuse plaintext in an encrypted channel; keep v1 readable.

Every failure raises `crypto.e2ee.CryptoError` whose `reason` names the failed check. This
module is the public face: the account and Olm live in `envelope_olm`, Megolm sessions and
shares in `envelope_megolm`, the replay guard in `envelope_replay`, shared constants and
encodings in `envelope_wire` (split to keep each module under the house's size limit), and
everything is importable from here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Literal

import vodozemac

from . import envelope_wire as w
from .e2ee import ALG as V1_ALG
from .e2ee import CryptoError, frank_commitment, pack
from .e2ee import decrypt as v1_decrypt
from .envelope_megolm import (
    InboundSessions,
    KeyShare,
    OutboundSession,
    make_share,
    open_share,
    share_statement,
)
from .envelope_olm import OLM_NORMAL, OLM_PREKEY, DeviceAccount, Olm, OlmPlaintext
from .envelope_replay import ReplayGuard
from .envelope_wire import (
    ALG,
    FRANK_BYTES,
    MAX_ID_CHARS,
    MAX_INDEX,
    MAX_MM_BYTES,
    MAX_STH_BYTES,
    MAX_TS,
    MESSAGE_TAG,
    ROTATE_AFTER_MESSAGES,
    ROTATE_AFTER_MS,
    SESSION_ID_CHARS,
    SIG_BYTES,
    VERSION,
    MemberCheck,
    SessionRef,
    b64_decode,
    b64_encode,
)

__all__ = [
    "ALG",
    "OLM_NORMAL",
    "OLM_PREKEY",
    "ROTATE_AFTER_MESSAGES",
    "ROTATE_AFTER_MS",
    "VERSION",
    "CryptoError",
    "DeviceAccount",
    "InboundSessions",
    "KeyShare",
    "Kind",
    "MemberCheck",
    "Olm",
    "OlmPlaintext",
    "Opened",
    "OutboundSession",
    "ReplayGuard",
    "SessionRef",
    "b64_decode",
    "b64_encode",
    "classify",
    "decrypt_v2",
    "encrypt_v2",
    "make_share",
    "message_statement",
    "open_share",
    "open_v1",
    "payload_bytes",
    "server_verify_v2",
    "share_statement",
]

BODY_KEYS = frozenset({"v", "alg", "device", "session", "index", "ts", "mm", "sig", "frank"})
PAYLOAD_KEYS = frozenset({"text", "fk", "ts", "sth"})


# ---------------------------------------------------------------------------------------------
# the v2 envelope


def message_statement(
    channel: str,
    sender_user: str,
    sender_device: str,
    session_id: str,
    message_index: int,
    client_msg_id: str,
    ts: int,
    frank: bytes,
    mm: bytes,
) -> bytes:
    """What a v2 envelope's `sig` signs (docs/e2ee/messages.md, "The signed statement")."""
    return pack(
        [
            MESSAGE_TAG, channel, sender_user, sender_device, session_id, message_index,
            client_msg_id, ts, frank, hashlib.sha256(mm).digest(),
        ]
    )  # fmt: skip


def payload_bytes(text: str, fk: bytes, ts: int, sth: bytes | None) -> bytes:
    """The Megolm plaintext: a map with exactly text, fk, ts, sth, in that order."""
    return pack({"text": text, "fk": fk, "ts": ts, "sth": sth})


@dataclass(frozen=True)
class Opened:
    """A decrypted message. `verified` is True only for v2: the sender device's key came from
    the identity layer, the signature covered everything shown. v1 results say False."""

    text: str
    franking_key: bytes
    ts: int | None
    sth: bytes | None
    verified: bool
    version: int = VERSION
    epoch: int | None = None  # the membership epoch the Megolm session was shared under


def encrypt_v2(
    account: DeviceAccount,
    outbound: OutboundSession,
    channel: str,
    user: str,
    client_msg_id: str,
    text: str,
    *,
    sth: bytes | None = None,
    now_ms: int | None = None,
    fk: bytes | None = None,
    epoch: int | None = None,
) -> dict[str, Any]:
    """A v2 envelope for `publish`. Refuses an outbound session of another channel, or one
    that must be rotated (`needs_rotation` against `epoch`, the membership epoch the client
    knows; by default the session's own, which still checks age and count)."""
    ts = w.now_ms() if now_ms is None else now_ms
    if outbound.channel != channel:
        raise CryptoError("outbound session is for another channel")
    if outbound.needs_rotation(ts, outbound.epoch if epoch is None else epoch):
        raise CryptoError("outbound session must be rotated before sending")
    if not w.is_str(client_msg_id, 1, MAX_ID_CHARS):
        raise CryptoError("client_msg_id must be 1-64 characters")
    if sth is not None and not (isinstance(sth, bytes) and len(sth) <= MAX_STH_BYTES):
        raise CryptoError("sth must be at most 4096 bytes")
    fk = os.urandom(FRANK_BYTES) if fk is None else fk
    if not w.is_bytes(fk, FRANK_BYTES):
        raise CryptoError("franking key must be 32 bytes")
    index = outbound.message_index
    message = outbound.session.encrypt(payload_bytes(text, fk, ts, sth))
    mm = message.to_bytes()
    outbound.count += 1
    if message.message_index() != index:
        raise CryptoError("Megolm index moved unexpectedly")
    frank = frank_commitment(fk, text)
    statement = message_statement(
        channel, user, account.device, outbound.session_id, index, client_msg_id, ts, frank, mm
    )
    return {
        "v": VERSION,
        "alg": ALG,
        "device": account.device,
        "session": outbound.session_id,
        "index": index,
        "ts": ts,
        "mm": mm,
        "sig": account.sign(statement),
        "frank": frank,
    }


def _check_body(body: object, *, strict: bool) -> dict[str, Any]:
    """The envelope's shape and sizes. `strict` (the server, before storing): no other keys.
    Receivers tolerate others (the server adds `ftag`) and never read them."""
    if not isinstance(body, dict):
        raise CryptoError("envelope is not a map")
    keys = set(body)
    if not BODY_KEYS <= keys or (strict and keys != BODY_KEYS):
        raise CryptoError("envelope has the wrong fields")
    if not (
        body["v"] == VERSION
        and type(body["v"]) is int
        and body["alg"] == ALG
        and w.is_str(body["device"], 1, MAX_ID_CHARS)
        and w.is_str(body["session"], SESSION_ID_CHARS, SESSION_ID_CHARS)
        and w.is_int(body["index"], 0, MAX_INDEX)
        and w.is_int(body["ts"], 0, MAX_TS)
        and isinstance(body["mm"], bytes)
        and 0 < len(body["mm"]) <= MAX_MM_BYTES
        and w.is_bytes(body["sig"], SIG_BYTES)
        and w.is_bytes(body["frank"], FRANK_BYTES)
    ):
        raise CryptoError("envelope field has the wrong type or size")
    return body


def _megolm_message(mm: bytes, index: int) -> vodozemac.MegolmMessage:
    try:
        message = vodozemac.MegolmMessage.from_bytes(mm)
    except (vodozemac.DecodeException, ValueError):
        raise CryptoError("mm is not a Megolm message") from None
    if message.message_index() != index:
        raise CryptoError("Megolm message index is not the envelope's index")
    return message


def _verify_message(
    body: dict[str, Any], channel: str, sender_user: str, client_msg_id: str, ed25519: bytes
) -> None:
    statement = message_statement(
        channel, sender_user, body["device"], body["session"], body["index"], client_msg_id,
        body["ts"], body["frank"], body["mm"],
    )  # fmt: skip
    w.verify(ed25519, statement, body["sig"], "bad signature")


def server_verify_v2(
    body: object, channel: str, sender_user: str, client_msg_id: str, sender_ed25519: bytes
) -> None:
    """What the server checks before storing a v2 envelope (it cannot decrypt): exactly the
    fields, types and sizes; `mm` parses as a Megolm message with the envelope's index and
    carries a valid signature by the session key (`session`); `sig` verifies against the key
    of `body["device"]`, registered to the sending user (the caller looks it up)."""
    checked = _check_body(body, strict=True)
    _megolm_message(checked["mm"], checked["index"])
    mm = checked["mm"]
    if len(mm) <= SIG_BYTES:
        raise CryptoError("mm is too short")
    session_key = b64_decode(checked["session"])
    w.verify(session_key, mm[:-SIG_BYTES], mm[-SIG_BYTES:], "mm is not signed by its session")
    _verify_message(checked, channel, sender_user, client_msg_id, sender_ed25519)


def decrypt_v2(
    body: object,
    channel: str,
    sender_user: str,
    client_msg_id: str,
    sender_ed25519: bytes,
    inbound_sessions: InboundSessions,
    replay_guard: ReplayGuard,
    *,
    seq: int | None = None,
) -> Opened:
    """Open a v2 envelope, in this order: shape; the device signature (with the key the
    identity layer verified for (`sender_user`, `body["device"]`)); the Megolm session held for
    (channel, sender_user, device, session); the Megolm message's index equals the envelope's;
    Megolm decryption; the payload's ts equals the envelope's; the franking commitment; the
    replay guard (`seq`: where the history put it, so the same stored message read twice is
    not a replay)."""
    checked = _check_body(body, strict=False)
    _verify_message(checked, channel, sender_user, client_msg_id, sender_ed25519)
    ref = (channel, sender_user, checked["device"], checked["session"])
    session = inbound_sessions.get(ref)
    if session is None:
        raise CryptoError("no key for that sender device's session in this channel")
    message = _megolm_message(checked["mm"], checked["index"])
    try:
        decrypted = session.decrypt(message)
    except (vodozemac.MegolmDecryptionException, ValueError):
        raise CryptoError("Megolm message does not open: altered, or before the key") from None
    if decrypted.message_index != checked["index"]:
        raise CryptoError("Megolm message index is not the envelope's index")
    payload = w.unpack(decrypted.plaintext, "payload")
    if not (
        isinstance(payload, dict)
        and set(payload) == PAYLOAD_KEYS
        and isinstance(payload["text"], str)
        and w.is_bytes(payload["fk"], FRANK_BYTES)
        and w.is_int(payload["ts"], 0, MAX_TS)
        and (
            payload["sth"] is None
            or (isinstance(payload["sth"], bytes) and len(payload["sth"]) <= MAX_STH_BYTES)
        )
    ):
        raise CryptoError("payload has the wrong shape")
    if payload["ts"] != checked["ts"]:
        raise CryptoError("payload time is not the envelope's time")
    if not hmac.compare_digest(frank_commitment(payload["fk"], payload["text"]), checked["frank"]):
        raise CryptoError("franking commitment does not match the plaintext")
    replay_guard.check(
        sender_user, checked["device"], checked["session"], checked["index"], client_msg_id,
        seq=seq,
    )  # fmt: skip
    return Opened(
        payload["text"], payload["fk"], payload["ts"], payload["sth"], verified=True,
        epoch=inbound_sessions.epoch_of(ref),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# which path a body takes


Kind = Literal["v2", "v1", "plain"]


def classify(body: object, encrypted_channel: bool, *, v1_allowed: bool = True) -> Kind:
    """Which path opens `body`: "v2" (`decrypt_v2`), "v1" (`open_v1`; readable, not
    `verified`) or "plain" (`{"alg": "none"}`, only outside encrypted channels). Plaintext in
    an encrypted channel raises CryptoError("plaintext in an encrypted channel"). A channel
    the client knows has moved to v2 can pass `v1_allowed=False`: a v1 envelope is then
    refused too (its keys come from the server, so it is the next downgrade)."""
    if not isinstance(body, dict):
        raise CryptoError("body is not a map")
    alg, version = body.get("alg"), body.get("v")
    if alg == "none":
        if encrypted_channel:
            raise CryptoError("plaintext in an encrypted channel")
        return "plain"
    if type(version) is int and version == VERSION and alg == ALG:
        return "v2"
    if type(version) is int and version == 1 and alg == V1_ALG:
        if not v1_allowed:
            raise CryptoError("v1 envelope in a channel that moved to v2")
        return "v1"
    raise CryptoError("unknown envelope version or algorithm")


def open_v1(
    body: dict[str, Any],
    channel: str,
    sender_user: str,
    client_msg_id: str,
    channel_key: bytes,
    signing_key: bytes,
    replay_guard: ReplayGuard | None = None,
    *,
    seq: int | None = None,
) -> Opened:
    """A v1 envelope through the v1 path (crypto/e2ee.py), marked `verified=False`: its key
    came from a directory the server controls, it has no sender time, and only the
    (sender, client_msg_id) replay rule applies."""
    plain = v1_decrypt(body, channel, client_msg_id, channel_key, signing_key)
    if replay_guard is not None:
        replay_guard.check_id(sender_user, body["device"], client_msg_id, seq=seq)
    return Opened(plain.text, plain.franking_key, None, None, verified=False, version=1)
