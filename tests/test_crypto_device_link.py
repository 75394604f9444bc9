"""Adding a device from a trusted one by two QR codes (crypto/device_link.py)."""

from __future__ import annotations

import pytest
import vodozemac

from realtime_safety.crypto.device_link import answer, approve, offer, short_code
from realtime_safety.crypto.e2ee import CryptoError
from realtime_safety.crypto.identity import verified_devices
from realtime_safety.crypto.user_keys import UserKeys


def test_a_scanned_pair_of_codes_certifies_the_new_device() -> None:
    ivy = UserKeys.generate("ivy")
    new = vodozemac.Account()
    code = answer(offer(ivy), new, "d-tablet")
    cert = approve(ivy, code, 1_700_000_000_000)
    [device] = verified_devices("ivy", ivy.public, [cert])
    assert device.device == "d-tablet"
    assert device.ed25519 == cert.ed25519 and device.curve25519 == cert.curve25519
    assert short_code(code) == short_code(code) and len(short_code(code)) == 6


def test_an_answer_to_another_users_offer_or_key_is_refused() -> None:
    ivy, eve = UserKeys.generate("ivy"), UserKeys.generate("eve")
    new = vodozemac.Account()
    with pytest.raises(CryptoError, match="another user"):
        approve(ivy, answer(offer(eve), new, "d-x"), 1)
    impostor = UserKeys("ivy", eve.signing)  # the same user id, someone else's key
    with pytest.raises(CryptoError, match="self-signature"):
        approve(ivy, answer(offer(impostor), new, "d-x"), 1)


def test_a_tampered_answer_is_refused() -> None:
    ivy = UserKeys.generate("ivy")
    code = bytearray(answer(offer(ivy), vodozemac.Account(), "d-x"))
    code[-1] ^= 1  # the acceptance signature
    with pytest.raises(CryptoError):
        approve(ivy, bytes(code), 1)
    other = vodozemac.Account()  # keys swapped in by whoever carried the answer
    honest = answer(offer(ivy), vodozemac.Account(), "d-x")
    swapped = honest.replace(honest[-64 - 2 - 32 - 2 - 32 : -64 - 2], b"")  # not a valid code
    with pytest.raises(CryptoError):
        approve(ivy, swapped, 1)
    assert short_code(honest) != short_code(answer(offer(ivy), other, "d-x"))
    with pytest.raises(CryptoError, match="not a"):
        approve(ivy, offer(ivy), 1)
