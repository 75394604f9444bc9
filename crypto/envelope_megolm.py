"""Megolm sessions and the key shares that hand them out (E2EE v2, docs/e2ee/messages.md).

- `OutboundSession`: this device's sending session for one channel, with the rotation rules.
- `make_share` / `open_share`: the signed statement giving a session key to one recipient
  device; it travels inside an Olm message (crypto/envelope_olm.py).
- `InboundSessions`: sessions received from others, found only by (channel, sender user,
  sender device, session id) as a verified share bound them, with the deletion hooks that
  give forward secrecy on the receiving side."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import vodozemac

from . import envelope_wire as w
from .e2ee import CryptoError, pack
from .envelope_olm import DeviceAccount, OlmPlaintext
from .envelope_wire import (
    MAX_ID_CHARS,
    MAX_INDEX,
    MAX_TS,
    ROTATE_AFTER_MESSAGES,
    ROTATE_AFTER_MS,
    SESSION_ID_CHARS,
    SESSION_KEY_BYTES,
    SHARE_TAG,
    SIG_BYTES,
    MemberCheck,
    SessionRef,
)


@dataclass
class OutboundSession:
    """This device's sending Megolm session for one channel, made under a membership epoch."""

    channel: str
    session: vodozemac.GroupSession
    created_ms: int
    epoch: int
    count: int = 0  # messages encrypted with it

    @classmethod
    def new(cls, channel: str, epoch: int, now_ms: int | None = None) -> OutboundSession:
        created = w.now_ms() if now_ms is None else now_ms
        return cls(channel, vodozemac.GroupSession(), created, epoch)

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def message_index(self) -> int:
        """The index the next message will have (and a share made now starts at)."""
        return self.session.message_index

    @property
    def session_key(self) -> bytes:
        """The Megolm session key at the current index, raw bytes (229)."""
        return w.b64_decode(self.session.session_key.to_base64())

    def needs_rotation(self, now_ms: int, epoch: int) -> bool:
        """True when a new session must be made before sending: the membership epoch changed,
        `ROTATE_AFTER_MESSAGES` messages were sent, or it is `ROTATE_AFTER_MS` old."""
        return (
            epoch != self.epoch
            or self.count >= ROTATE_AFTER_MESSAGES
            or now_ms - self.created_ms >= ROTATE_AFTER_MS
        )

    def pickle(self, store_key: bytes) -> bytes:
        entry = [self.channel, self.created_ms, self.epoch, self.count]
        return w.store("outbound", [*entry, self.session.pickle(store_key)])

    @classmethod
    def unpickle(cls, data: bytes, store_key: bytes) -> OutboundSession:
        try:
            channel, created, epoch, count, pickled = w.unstore(data, "outbound")
            session = vodozemac.GroupSession.from_pickle(pickled, store_key)
        except (vodozemac.PickleException, ValueError, TypeError):
            raise CryptoError("outbound session store does not open with this key") from None
        return cls(channel, session, created, epoch, count)


@dataclass(frozen=True)
class KeyShare:
    """A verified key share (only `open_share` makes these)."""

    channel: str
    session_id: str
    first_index: int
    session_key: bytes
    sender_user: str
    sender_device: str
    recipient_user: str
    recipient_device: str
    epoch: int
    ts: int

    @property
    def ref(self) -> SessionRef:
        return (self.channel, self.sender_user, self.sender_device, self.session_id)


@dataclass
class _Inbound:
    session: vodozemac.InboundGroupSession
    epoch: int
    received_ms: int


class InboundSessions:
    """Megolm sessions received from others, keyed by (channel, sender user, sender device,
    session id) -- the binding a verified share proved -- and never by a session id alone: a
    session is found only for the sender and channel it was shared for."""

    def __init__(self) -> None:
        self._sessions: dict[SessionRef, _Inbound] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, ref: object) -> bool:
        return ref in self._sessions

    def add(self, share: KeyShare, *, now_ms: int | None = None) -> bool:
        """Import a verified share. A share for a session already held replaces it only when
        it starts earlier (it opens more); returns whether it was stored."""
        session = _inbound_from_share(share)
        held = self._sessions.get(share.ref)
        if held is not None and held.session.first_known_index <= share.first_index:
            return False
        received = w.now_ms() if now_ms is None else now_ms
        self._sessions[share.ref] = _Inbound(session, share.epoch, received)
        return True

    def get(self, ref: SessionRef) -> vodozemac.InboundGroupSession | None:
        held = self._sessions.get(ref)
        return None if held is None else held.session

    def epoch_of(self, ref: SessionRef) -> int | None:
        held = self._sessions.get(ref)
        return None if held is None else held.epoch

    def ratchet_to(self, ref: SessionRef, index: int) -> None:
        """Forward secrecy inside a session: keep only the ratchet from `index` on, so a key
        stolen later cannot open messages before `index` (call once those are read)."""
        held = self._sessions.get(ref)
        if held is None or index <= held.session.first_known_index:
            return
        exported = held.session.export_at(index)
        if exported is None:
            raise CryptoError("cannot ratchet that session to that index")
        held.session = vodozemac.InboundGroupSession.import_session(exported)

    def delete(self, ref: SessionRef) -> bool:
        return self._sessions.pop(ref, None) is not None

    def forget_before(
        self,
        *,
        received_before_ms: int | None = None,
        channel: str | None = None,
        epoch_below: int | None = None,
    ) -> int:
        """Delete sessions (of `channel`, or all) received before `received_before_ms` or
        shared under a membership epoch below `epoch_below`; returns how many. What is deleted
        can no longer be read by anyone who steals the device afterwards."""
        doomed = [
            ref
            for ref, held in self._sessions.items()
            if (channel is None or ref[0] == channel)
            and (
                (received_before_ms is not None and held.received_ms < received_before_ms)
                or (epoch_below is not None and held.epoch < epoch_below)
            )
        ]
        for ref in doomed:
            del self._sessions[ref]
        return len(doomed)

    def pickle(self, store_key: bytes) -> bytes:
        return w.store(
            "inbound",
            [
                [*ref, held.epoch, held.received_ms, held.session.pickle(store_key)]
                for ref, held in self._sessions.items()
            ],
        )

    @classmethod
    def unpickle(cls, data: bytes, store_key: bytes) -> InboundSessions:
        inbound = cls()
        try:
            for channel, user, device, sid, epoch, received, pickled in w.unstore(data, "inbound"):
                session = vodozemac.InboundGroupSession.from_pickle(pickled, store_key)
                inbound._sessions[channel, user, device, sid] = _Inbound(session, epoch, received)
        except (vodozemac.PickleException, ValueError, TypeError):
            raise CryptoError("inbound session store does not open with this key") from None
        return inbound


def _inbound_from_share(share: KeyShare) -> vodozemac.InboundGroupSession:
    """The Megolm session a share carries, checked against the share's session id and index."""
    try:
        session = vodozemac.InboundGroupSession(
            vodozemac.SessionKey(w.b64_encode(share.session_key))
        )
    except (vodozemac.SessionKeyDecodeException, ValueError):
        raise CryptoError("share carries no valid Megolm session key") from None
    if session.session_id != share.session_id:
        raise CryptoError("share's session key is for another session")
    if session.first_known_index != share.first_index:
        raise CryptoError("share's session key starts at another index")
    return session


# ---------------------------------------------------------------------------------------------
# key shares


def share_statement(
    channel: str,
    session_id: str,
    first_index: int,
    session_key: bytes,
    sender_user: str,
    sender_device: str,
    recipient_user: str,
    recipient_device: str,
    epoch: int,
    ts_ms: int,
) -> bytes:
    """What a key share's `sig` signs (docs/e2ee/messages.md, "Key shares")."""
    return pack(
        [
            SHARE_TAG, channel, session_id, first_index, session_key, sender_user,
            sender_device, recipient_user, recipient_device, epoch, ts_ms,
        ]
    )  # fmt: skip


def make_share(
    account: DeviceAccount,
    outbound: OutboundSession,
    sender_user: str,
    recipient_user: str,
    recipient_device: str,
    *,
    now_ms: int | None = None,
) -> bytes:
    """The Olm plaintext handing `outbound` (from its current index) to one recipient device:
    pack({"statement": share_statement(...), "sig": device signature}). Encrypt it with
    `Olm.encrypt` to that device."""
    statement = share_statement(
        outbound.channel, outbound.session_id, outbound.message_index, outbound.session_key,
        sender_user, account.device, recipient_user, recipient_device, outbound.epoch,
        w.now_ms() if now_ms is None else now_ms,
    )  # fmt: skip
    return pack({"statement": statement, "sig": account.sign(statement)})


def _parse_share(statement: bytes) -> KeyShare:
    fields = w.unpack(statement, "share statement")
    if not isinstance(fields, list) or len(fields) != 11 or fields[0] != SHARE_TAG:
        raise CryptoError("not a key share statement")
    _, channel, sid, index, key, s_user, s_dev, r_user, r_dev, epoch, ts = fields
    if not (
        w.is_str(channel, 1, 256)
        and w.is_str(sid, SESSION_ID_CHARS, SESSION_ID_CHARS)
        and w.is_int(index, 0, MAX_INDEX)
        and w.is_bytes(key, SESSION_KEY_BYTES)
        and all(w.is_str(x, 1, 256) for x in (s_user, r_user))
        and all(w.is_str(x, 1, MAX_ID_CHARS) for x in (s_dev, r_dev))
        and w.is_int(epoch, 0, MAX_TS)
        and w.is_int(ts, 0, MAX_TS)
    ):
        raise CryptoError("key share statement has the wrong shape")
    return KeyShare(channel, sid, index, key, s_user, s_dev, r_user, r_dev, epoch, ts)


def open_share(
    olm_plaintext: OlmPlaintext,
    expected_recipient_user: str,
    expected_recipient_device: str,
    sender_verified_ed25519: bytes,
    sender_verified_curve25519: bytes,
    *,
    is_member: MemberCheck,
) -> KeyShare:
    """Check a key share that arrived over Olm, in this order: the Olm session is bound to the
    claimed sender device's verified Curve25519 key; the statement is signed by its verified
    Ed25519 key; it names that sender and this device as recipient; the session key matches
    the session id and first index; the sender device may share keys for the channel at that
    membership epoch (`is_member(channel, user, device, epoch)`, from the verified membership
    log). Returns the share for `InboundSessions.add`."""
    if not hmac.compare_digest(olm_plaintext.sender_curve25519, sender_verified_curve25519):
        raise CryptoError("share came through an Olm session of another key than the sender's")
    outer = w.unpack(olm_plaintext.plaintext, "key share")
    if not (
        isinstance(outer, dict)
        and set(outer) == {"statement", "sig"}
        and isinstance(outer["statement"], bytes)
        and w.is_bytes(outer["sig"], SIG_BYTES)
    ):
        raise CryptoError("not a key share")
    w.verify(sender_verified_ed25519, outer["statement"], outer["sig"], "bad share signature")
    share = _parse_share(outer["statement"])
    if (share.sender_user, share.sender_device) != (
        olm_plaintext.sender_user,
        olm_plaintext.sender_device,
    ):
        raise CryptoError("share names another sender than the device it came from")
    if (share.recipient_user, share.recipient_device) != (
        expected_recipient_user,
        expected_recipient_device,
    ):
        raise CryptoError("share is for another recipient")
    _inbound_from_share(share)
    if not is_member(share.channel, share.sender_user, share.sender_device, share.epoch):
        raise CryptoError("share sender is not a member device of the channel at that epoch")
    return share
