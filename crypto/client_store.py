"""A v2 client's state across restarts (docs/e2ee/messages.md, "At rest on the device").

    data = save(chat, passphrase)                    # after the session, or now and then
    chat = restore(data, passphrase, urls, token, user, user_keys)   # then `await chat.start()`

What is kept: the device account (its Olm identity and unused one-time keys), the Olm
sessions, the inbound and outbound Megolm sessions, the replay guard, the contact book (who is
verified, what is blocked), the key log monitor (the heads this device verified and how far it
read the log) and the device's certificate. Without them a restarted device would lose the
messages sent while it was away, trust the log and its contacts afresh, and forget replays.

The file: `pack({"magic": "rt.v2.client-store", "v": 1, "account": DeviceAccount.save(...),
"box": SecretBox(store_key).encrypt(pack({...}))})`: the account under the passphrase
(Argon2id), the rest under the account's own `store_key` (XSalsa20-Poly1305). A wrong
passphrase or a damaged file is a `CryptoError`.
"""

from __future__ import annotations

from typing import Any

import msgpack
import nacl.exceptions
import nacl.secret

from .client_v2 import SecureClient
from .contacts import ContactBook
from .e2ee import CryptoError, pack
from .envelope import DeviceAccount, InboundSessions, Olm, OutboundSession, ReplayGuard
from .identity import DeviceCertificate
from .transparency import LogMonitor
from .user_keys import UserKeys

MAGIC = "rt.v2.client-store"


def save(chat: SecureClient, passphrase: str, **limits: int) -> bytes:
    """Everything the device needs to carry on after a restart, encrypted (see above)."""
    key = chat.account.store_key
    monitor = chat.directory.monitor
    state = {
        "olm": chat.olm.pickle(),
        "inbound": chat.inbound.pickle(key),
        "outbound": [s.pickle(key) for s in chat._outbound.values()],
        "replays": chat.replays.to_bytes(),
        "contacts": chat.contacts.to_bytes(),
        "monitor": monitor.to_bytes() if monitor is not None else None,
        "certificate": chat.certificate.to_wire() if chat.certificate else None,
    }
    box = nacl.secret.SecretBox(key).encrypt(pack(state))
    account = chat.account.save(passphrase, **limits)
    return pack({"magic": MAGIC, "v": 1, "account": account, "box": bytes(box)})


def restore(
    data: bytes,
    passphrase: str,
    urls: list[str] | str,
    token: Any,
    user: str,
    user_keys: UserKeys | None,
    **options: Any,
) -> SecureClient:
    """A client with the state `save` wrote (not started: `await chat.start()`)."""
    try:
        outer = msgpack.unpackb(data, raw=False)
        if not isinstance(outer, dict) or outer.get("magic") != MAGIC or outer.get("v") != 1:
            raise CryptoError("not a client store")
        account = DeviceAccount.load(outer["account"], passphrase)
        key = account.store_key
        state = msgpack.unpackb(nacl.secret.SecretBox(key).decrypt(outer["box"]), raw=False)
    except nacl.exceptions.CryptoError:
        raise CryptoError("damaged client store") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CryptoError(f"not a client store: {exc}") from None
    cert = state["certificate"]
    chat = SecureClient(
        urls, token, user, account, user_keys,
        certificate=DeviceCertificate.from_wire(cert) if cert else None, **options,
    )  # fmt: skip
    chat.olm = Olm.unpickle(account, state["olm"])
    chat.inbound = InboundSessions.unpickle(state["inbound"], key)
    for pickled in state["outbound"]:
        session = OutboundSession.unpickle(pickled, key)
        chat._outbound[session.channel] = session
    chat.replays = ReplayGuard.from_bytes(state["replays"])
    policy = options.get("on_unverified_change", "block")
    chat.contacts = ContactBook.from_bytes(state["contacts"], on_unverified_change=policy)
    chat.directory.contacts = chat.contacts
    if state["monitor"] is not None:
        chat.directory.monitor = LogMonitor.from_bytes(state["monitor"])
    return chat
