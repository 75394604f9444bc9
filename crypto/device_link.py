"""Adding a device from one already trusted: two QR codes, no secret typed (docs/e2ee/identity.md,
"Adding a device", section 10a).

1. The trusted device (it holds the user key) shows `offer(user_keys)`: the user and the user
   key, tagged `rt.v2.link-offer`.
2. The new device scans it and shows `answer(offer_bytes, account, device)`: its keys and its
   signature accepting that user key (`identity.device_acceptance`), tagged
   `rt.v2.link-answer`.
3. The trusted device scans the answer and `approve`s it: it checks the answer is for its user
   and key, and certifies the new device (`UserKeys.certify` checks the acceptance first). It
   publishes the certificate with `keys.publish` (any device of a user may publish a certificate
   of another of that user's devices) and the new device finds it in the directory.

Each side sees the other's keys through the camera, so a server that swaps keys in between has
nothing to swap: the codes never travel through it. A device that cannot scan can compare
`short_code` on both screens instead, after the answer travels another way.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import vodozemac

from .e2ee import CryptoError, pack
from .identity import DeviceCertificate, device_acceptance, raw_curve25519, raw_ed25519
from .user_keys import UserKeys

OFFER_TAG = "rt.v2.link-offer"
ANSWER_TAG = "rt.v2.link-answer"


def _unpack(data: bytes, tag: str, size: int) -> list[Any]:
    try:
        fields = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise CryptoError(f"not a {tag} code") from None
    if not isinstance(fields, list) or len(fields) != size or fields[0] != tag:
        raise CryptoError(f"not a {tag} code")
    return fields


def offer(user_keys: UserKeys) -> bytes:
    """What the trusted device shows: pack(["rt.v2.link-offer", user, user_pub])."""
    return pack([OFFER_TAG, user_keys.user, user_keys.public])


def answer(offer_code: bytes, account: vodozemac.Account, device: str) -> bytes:
    """What the new device shows after scanning the offer: pack(["rt.v2.link-answer", user,
    device, ed25519, curve25519, acceptance signature of the offered user key])."""
    _, user, user_pub = _unpack(offer_code, OFFER_TAG, 3)
    if not (isinstance(user, str) and isinstance(user_pub, bytes) and len(user_pub) == 32):
        raise CryptoError("link offer has the wrong shape")
    sig = device_acceptance(account, user, device, user_pub)
    return pack(
        [
            ANSWER_TAG,
            user,
            device,
            raw_ed25519(account.ed25519_key),
            raw_curve25519(account.curve25519_key),
            sig,
        ]
    )


def approve(user_keys: UserKeys, answer_code: bytes, created_ms: int) -> DeviceCertificate:
    """The trusted device's side: certify the device that answered (refused when the answer
    is for another user or its acceptance does not verify under our user key)."""
    _, user, device, ed25519, curve25519, sig = _unpack(answer_code, ANSWER_TAG, 6)
    if user != user_keys.user:
        raise CryptoError("link answer is for another user")
    if not (
        isinstance(device, str)
        and all(isinstance(k, bytes) and len(k) == 32 for k in (ed25519, curve25519))
        and isinstance(sig, bytes)
    ):
        raise CryptoError("link answer has the wrong shape")
    return user_keys.certify(device, ed25519, curve25519, created_ms, sig)


def short_code(answer_code: bytes) -> str:
    """Six digits both screens show for the same answer (a comparison when no camera)."""
    digest = hashlib.sha256(b"rt.v2.link-code" + answer_code).digest()
    return f"{int.from_bytes(digest[:4], 'big') % 1_000_000:06d}"
