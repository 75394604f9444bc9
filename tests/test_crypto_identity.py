"""Cross-signing and contact verification (crypto/identity.py, crypto/user_keys.py,
crypto/contacts.py; docs/e2ee/identity.md).

The committed vectors (tests/vectors/identity-v2.json) are made by `make()` from the documented
steps with libsodium, msgpack and hashlib alone (not the module), and the module must produce
and accept exactly those bytes. Every verification path has its negative next to it.
Regenerate (only when the specification changes):
`python tests/test_crypto_identity.py > tests/vectors/identity-v2.json`."""

from __future__ import annotations

import hashlib
import json
import sys
import unicodedata
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import msgpack
import nacl.pwhash
import nacl.secret
import pytest
import vodozemac
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey, VerifyKey

from realtime_safety.crypto import contacts as ct
from realtime_safety.crypto import identity as idn
from realtime_safety.crypto.contacts import ContactBook
from realtime_safety.crypto.identity import (
    CryptoError,
    DeviceCertificate,
    Revocation,
    UserKeyStatement,
)
from realtime_safety.crypto.user_keys import UserKeys

FILE = Path(__file__).parent / "vectors" / "identity-v2.json"

INPUTS: dict[str, Any] = {
    "user": "alice",
    "user_seed": bytes(range(1, 33)).hex(),
    "rotated_user_seed": bytes(range(33, 65)).hex(),
    "contact": "bob",
    "contact_user_seed": bytes(range(65, 97)).hex(),
    "device": "d-phone-7f3a",
    # stands in for the device's vodozemac Ed25519 key (vodozemac cannot be seeded)
    "device_ed25519_seed": bytes(range(97, 129)).hex(),
    # the device's vodozemac Curve25519 key: only its public bytes are ever signed
    "device_curve25519": bytes(range(129, 161)).hex(),
    "created_ms": 1767225600000,
    "revoked_ms": 1767312000000,
    "rotated_ms": 1767398400000,
    "passphrase": "correct horse battery staple é",
    "backup_salt": bytes(range(16)).hex(),
    "backup_nonce": bytes(range(200, 224)).hex(),
    "backup_opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
    "backup_memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN,
}


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def signal_fingerprint(user: str, key: bytes) -> tuple[bytes, bytes, str]:
    """(first input, first 30 bytes of the result, 30 digits), as documented."""
    first = b"\x00\x00" + key + user.encode()
    h = first
    for _ in range(5200):
        h = hashlib.sha512(h + key).digest()
    digits = "".join(f"{int.from_bytes(h[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5))
    return first, h[:30], digits


def make(i: dict[str, Any]) -> dict[str, Any]:
    user, device, contact = i["user"], i["device"], i["contact"]
    user_key = SigningKey(bytes.fromhex(i["user_seed"]))
    rotated_key = SigningKey(bytes.fromhex(i["rotated_user_seed"]))
    contact_key = SigningKey(bytes.fromhex(i["contact_user_seed"]))
    device_key = SigningKey(bytes.fromhex(i["device_ed25519_seed"]))
    user_pub, rotated_pub = bytes(user_key.verify_key), bytes(rotated_key.verify_key)
    contact_pub, device_ed = bytes(contact_key.verify_key), bytes(device_key.verify_key)
    device_curve = bytes.fromhex(i["device_curve25519"])

    def sig(key: SigningKey, message: bytes) -> str:
        return key.sign(message).signature.hex()

    self_st = pack(["rt.v2.device-self", user, device, user_pub])
    cert_st = pack(["rt.v2.device", user, device, device_ed, device_curve, i["created_ms"]])
    revoke_st = pack(["rt.v2.revoke", user, device, i["revoked_ms"]])
    revoke_self_st = pack(["rt.v2.revoke-self", user, device, i["revoked_ms"]])
    announce_st = pack(["rt.v2.user-key", user, user_pub, i["created_ms"], b""])
    rotation_st = pack(["rt.v2.user-key", user, rotated_pub, i["rotated_ms"], user_pub])

    a_first, a_30, a_digits = signal_fingerprint(user, user_pub)
    b_first, b_30, b_digits = signal_fingerprint(contact, contact_pub)
    digits = "".join(sorted([a_digits, b_digits]))
    pairs = sorted([(user.encode(), user_pub, user), (contact.encode(), contact_pub, contact)])
    qr = pack(["rt.v2.verify", pairs[0][2], pairs[0][1], pairs[1][2], pairs[1][1]])

    salt, nonce = bytes.fromhex(i["backup_salt"]), bytes.fromhex(i["backup_nonce"])
    ops, mem = i["backup_opslimit"], i["backup_memlimit"]
    passphrase = unicodedata.normalize("NFC", i["passphrase"]).encode()
    box_key = nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=ops, memlimit=mem)
    secret = pack(["rt.v2.user-key-secret", user, bytes.fromhex(i["user_seed"])])
    box = bytes(nacl.secret.SecretBox(box_key).encrypt(secret, nonce))
    container = pack(
        {"magic": "rt.v2.user-key-backup", "salt": salt, "ops": ops, "mem": mem, "box": box}
    )
    return {
        "inputs": i,
        "user_pub": user_pub.hex(),
        "device_ed25519": device_ed.hex(),
        "device_self_signed": self_st.hex(),
        "device_sig": sig(device_key, self_st),
        "certificate_signed": cert_st.hex(),
        "certificate_sig": sig(user_key, cert_st),
        "revoke_signed": revoke_st.hex(),
        "revoke_sig": sig(user_key, revoke_st),
        "revoke_self_signed": revoke_self_st.hex(),
        "revoke_self_sig": sig(device_key, revoke_self_st),
        "user_key_signed": announce_st.hex(),
        "user_key_sig": sig(user_key, announce_st),
        "rotated_user_pub": rotated_pub.hex(),
        "rotation_signed": rotation_st.hex(),
        "rotation_sig": sig(rotated_key, rotation_st),
        "rotation_previous_sig": sig(user_key, rotation_st),
        "contact_user_pub": contact_pub.hex(),
        "fingerprint_input_user": a_first.hex(),
        "fingerprint_30_user": a_30.hex(),
        "digits_user": a_digits,
        "fingerprint_input_contact": b_first.hex(),
        "fingerprint_30_contact": b_30.hex(),
        "digits_contact": b_digits,
        "safety_number": " ".join(digits[k : k + 5] for k in range(0, 60, 5)),
        "verify_payload": qr.hex(),
        "backup_key": box_key.hex(),
        "backup_secret": secret.hex(),
        "backup_box": box.hex(),
        "backup": container.hex(),
    }


def committed() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FILE.read_text())
    return data


# --- fixtures from the vector inputs ---------------------------------------------------------

I = INPUTS  # noqa: E741
ALICE = UserKeys(I["user"], SigningKey(bytes.fromhex(I["user_seed"])))
ALICE2 = UserKeys(I["user"], SigningKey(bytes.fromhex(I["rotated_user_seed"])))
BOB = UserKeys(I["contact"], SigningKey(bytes.fromhex(I["contact_user_seed"])))
DEVICE_KEY = SigningKey(bytes.fromhex(I["device_ed25519_seed"]))
DEVICE_ED = bytes(DEVICE_KEY.verify_key)
DEVICE_CURVE = bytes.fromhex(I["device_curve25519"])
DEVICE = I["device"]


def accept(keys: UserKeys, device: str = DEVICE, signer: SigningKey = DEVICE_KEY) -> bytes:
    """The device's acceptance of `keys`, as a vodozemac account would sign it."""
    return signer.sign(idn.device_self_statement(keys.user, device, keys.public)).signature


def cert_for(
    keys: UserKeys = ALICE,
    device: str = DEVICE,
    signer: SigningKey = DEVICE_KEY,
    created_ms: int = I["created_ms"],
) -> DeviceCertificate:
    ed = bytes(signer.verify_key)
    return keys.certify(device, ed, DEVICE_CURVE, created_ms, accept(keys, device, signer))


def reason(exc: pytest.ExceptionInfo[CryptoError]) -> str:
    return exc.value.reason


# --- the vectors ---------------------------------------------------------------------------


def test_the_committed_vector_is_what_the_documented_steps_give() -> None:
    assert committed() == make(INPUTS)


def test_the_module_produces_the_vector_bytes() -> None:
    V = committed()
    assert ALICE.public.hex() == V["user_pub"]
    statement = idn.device_self_statement(I["user"], DEVICE, ALICE.public)
    assert statement.hex() == V["device_self_signed"]
    cert = ALICE.certify(DEVICE, DEVICE_ED, DEVICE_CURVE, I["created_ms"], accept(ALICE))
    assert cert.statement().hex() == V["certificate_signed"]
    assert cert.user_sig.hex() == V["certificate_sig"]
    assert cert.device_sig.hex() == V["device_sig"]
    rev = ALICE.revoke(DEVICE, I["revoked_ms"])
    assert (rev.statement().hex(), rev.sig.hex()) == (V["revoke_signed"], V["revoke_sig"])
    own = Revocation.by_own_device(DEVICE_KEY, I["user"], DEVICE, I["revoked_ms"])
    assert own.statement().hex() == V["revoke_self_signed"]
    assert own.sig.hex() == V["revoke_self_sig"]
    first = ALICE.announce(I["created_ms"])
    assert (first.statement().hex(), first.sig.hex()) == (V["user_key_signed"], V["user_key_sig"])
    rot = ALICE2.announce(I["rotated_ms"], rotated_from=ALICE)
    assert rot.statement().hex() == V["rotation_signed"]
    assert (rot.sig.hex(), rot.previous_sig.hex()) == (
        V["rotation_sig"],
        V["rotation_previous_sig"],
    )
    assert ct.fingerprint(I["user"], ALICE.public)[:30].hex() == V["fingerprint_30_user"]
    assert ct.fingerprint_digits(I["contact"], BOB.public) == V["digits_contact"]
    assert ct.safety_number(I["user"], ALICE.public, I["contact"], BOB.public) == V["safety_number"]
    payload = ct.verification_payload(I["contact"], BOB.public, I["user"], ALICE.public)
    assert payload.hex() == V["verify_payload"]
    backup = ALICE.backup(
        I["passphrase"],
        opslimit=I["backup_opslimit"],
        memlimit=I["backup_memlimit"],
        _salt=bytes.fromhex(I["backup_salt"]),
        _nonce=bytes.fromhex(I["backup_nonce"]),
    )
    assert backup.hex() == V["backup"]


def test_the_module_accepts_the_vector_bytes() -> None:
    V = committed()
    cert = DeviceCertificate(
        I["user"], DEVICE, bytes.fromhex(V["device_ed25519"]), DEVICE_CURVE, I["created_ms"],
        bytes.fromhex(V["certificate_sig"]), bytes.fromhex(V["device_sig"]),
    )  # fmt: skip
    idn.verify_certificate(cert, bytes.fromhex(V["user_pub"]))
    rot = UserKeyStatement(
        I["user"], bytes.fromhex(V["rotated_user_pub"]), I["rotated_ms"],
        bytes.fromhex(V["user_pub"]), bytes.fromhex(V["rotation_sig"]),
        bytes.fromhex(V["rotation_previous_sig"]),
    )  # fmt: skip
    idn.verify_user_key(rot)
    restored = UserKeys.restore(bytes.fromhex(V["backup"]), I["passphrase"])
    assert restored.public.hex() == V["user_pub"] and restored.user == I["user"]


# --- vodozemac at the boundary ------------------------------------------------------------


def test_a_vodozemac_account_is_certified_and_its_signatures_verify_as_ed25519() -> None:
    account = vodozemac.Account()
    ed, curve = idn.raw_ed25519(account.ed25519_key), idn.raw_curve25519(account.curve25519_key)
    assert curve == account.curve25519_key.to_bytes()
    signature = idn.raw_signature(account.sign(b"hello"))
    VerifyKey(ed).verify(b"hello", signature)  # vodozemac's Ed25519 is standard Ed25519
    cert = ALICE.certify_account(account, "d-laptop", 5)
    assert (cert.ed25519, cert.curve25519) == (ed, curve)
    cert.verify(ALICE.public)
    own = Revocation.by_own_device(account, ALICE.user, "d-laptop", 6)
    idn.verify_revocation(own, ALICE.public, ed)


class _FakeKey:
    def __init__(self, text: str) -> None:
        self.text = text

    def to_base64(self) -> str:
        return self.text


@pytest.mark.parametrize("text", ["AAAA", "not base64!", "A" * 44])
def test_raw_conversions_refuse_anything_but_the_exact_size(text: str) -> None:
    with pytest.raises(CryptoError):
        idn.raw_ed25519(cast(vodozemac.Ed25519PublicKey, _FakeKey(text)))


# --- device certificates --------------------------------------------------------------------


def test_a_certificate_round_trips_the_wire_and_verifies() -> None:
    cert = cert_for()
    again = DeviceCertificate.from_wire(cert.to_wire())
    assert again == cert
    again.verify(ALICE.public)


TAMPER = {
    "user": ("user", "mallory", "certificate signature"),
    "device": ("device", "d-other", "certificate signature"),
    "ed25519": ("ed25519", bytes(SigningKey(b"\x05" * 32).verify_key), "certificate signature"),
    "curve25519": ("curve25519", b"\x07" * 32, "certificate signature"),
    "created_ms": ("created_ms", I["created_ms"] + 1, "certificate signature"),
    "user_sig": ("user_sig", bytes(64), "certificate signature"),
    "device_sig": ("device_sig", bytes(64), "device self-signature"),
}


@pytest.mark.parametrize("field", list(TAMPER))
def test_a_certificate_with_any_field_changed_fails_the_named_check(field: str) -> None:
    name, value, check = TAMPER[field]
    bad = replace(cert_for(), **{name: value})
    with pytest.raises(CryptoError) as exc:
        bad.verify(ALICE.public)
    assert reason(exc).startswith(check)


def test_a_flipped_bit_in_a_signature_fails() -> None:
    cert = cert_for()
    flipped = bytes([cert.user_sig[0] ^ 1]) + cert.user_sig[1:]
    with pytest.raises(CryptoError, match="certificate signature"):
        replace(cert, user_sig=flipped).verify(ALICE.public)


def test_a_certificate_does_not_verify_under_another_user_key() -> None:
    with pytest.raises(CryptoError, match="certificate signature"):
        cert_for().verify(BOB.public)


def test_someone_elses_device_keys_cannot_be_certified_as_ones_own() -> None:
    """Mallory signs a certificate for alice's device keys with alice's real acceptance (of
    alice's key): the device never accepted mallory's key, so the self-signature fails."""
    mallory = UserKeys.generate(I["user"])
    unsigned = cert_for()
    sig = mallory.signing.sign(unsigned.statement()).signature
    with pytest.raises(CryptoError, match="device self-signature"):
        replace(unsigned, user_sig=sig).verify(mallory.public)
    with pytest.raises(CryptoError, match="device self-signature"):
        mallory.certify(DEVICE, DEVICE_ED, DEVICE_CURVE, 1, accept(ALICE))


def test_certify_refuses_a_device_acceptance_for_another_device_id() -> None:
    with pytest.raises(CryptoError, match="device self-signature"):
        ALICE.certify("d-other", DEVICE_ED, DEVICE_CURVE, 1, accept(ALICE))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ed25519", b"\x01" * 31),
        ("curve25519", "not bytes"),
        ("user_sig", b"\x00" * 63),
        ("created_ms", -1),
        ("created_ms", True),
        ("created_ms", "1"),
        ("user", ""),
        ("device", 7),
    ],
)
def test_from_wire_refuses_malformed_fields(field: str, value: object) -> None:
    wire = cert_for().to_wire()
    wire[field] = value
    with pytest.raises(CryptoError, match=field):
        DeviceCertificate.from_wire(wire)


def test_from_wire_refuses_a_missing_field_and_verify_a_short_user_key() -> None:
    wire = cert_for().to_wire()
    del wire["device_sig"]
    with pytest.raises(CryptoError, match="device_sig"):
        DeviceCertificate.from_wire(wire)
    with pytest.raises(CryptoError, match="user key"):
        cert_for().verify(ALICE.public[:31])


# --- revocations ----------------------------------------------------------------------------


def test_a_revocation_by_the_user_key_verifies_and_round_trips() -> None:
    rev = ALICE.revoke(DEVICE, 10)
    idn.verify_revocation(rev, ALICE.public)
    assert Revocation.from_wire(rev.to_wire()) == rev
    with pytest.raises(CryptoError, match="revocation signature"):
        idn.verify_revocation(rev, BOB.public)
    with pytest.raises(CryptoError, match="revocation signature"):
        idn.verify_revocation(replace(rev, revoked_ms=11), ALICE.public)
    with pytest.raises(CryptoError, match="revocation signature"):
        idn.verify_revocation(replace(rev, device="d-other"), ALICE.public)


def test_a_self_revocation_needs_the_devices_key_and_its_own_tag() -> None:
    own = Revocation.by_own_device(DEVICE_KEY, ALICE.user, DEVICE, 10)
    idn.verify_revocation(own, ALICE.public, DEVICE_ED)
    assert Revocation.from_wire(own.to_wire()) == own
    with pytest.raises(CryptoError, match="needs the device"):
        idn.verify_revocation(own, ALICE.public)
    with pytest.raises(CryptoError, match="self-revocation signature"):
        idn.verify_revocation(own, ALICE.public, BOB.public)
    # a user-key revocation relabelled as a self-revocation (and back) does not verify
    by_user = ALICE.revoke(DEVICE, 10)
    with pytest.raises(CryptoError, match="self-revocation signature"):
        idn.verify_revocation(replace(by_user, by_device=True), ALICE.public, ALICE.public)
    with pytest.raises(CryptoError, match="revocation signature"):
        idn.verify_revocation(replace(own, by_device=False), DEVICE_ED)


def test_revocation_from_wire_refuses_an_unknown_signer() -> None:
    wire = ALICE.revoke(DEVICE, 10).to_wire()
    wire["by"] = "server"
    with pytest.raises(CryptoError, match="by"):
        Revocation.from_wire(wire)


# --- user-key statements --------------------------------------------------------------------


def test_an_announcement_and_a_rotation_verify() -> None:
    first = ALICE.announce(1)
    idn.verify_user_key(first)
    assert not first.is_rotation
    rot = ALICE2.announce(2, rotated_from=ALICE)
    idn.verify_user_key(rot)
    assert rot.is_rotation and rot.previous == ALICE.public
    assert UserKeyStatement.from_wire(rot.to_wire()) == rot


def test_a_rotation_must_carry_the_old_keys_valid_signature() -> None:
    rot = ALICE2.announce(2, rotated_from=ALICE)
    with pytest.raises(CryptoError, match="rotation signature"):
        idn.verify_user_key(replace(rot, previous_sig=bytes(64)))
    with pytest.raises(CryptoError, match="previous_sig must be 64"):
        idn.verify_user_key(replace(rot, previous_sig=b""))
    with pytest.raises(CryptoError, match="self-signature"):
        idn.verify_user_key(replace(rot, sig=rot.previous_sig))
    with pytest.raises(CryptoError, match="self-signature"):
        idn.verify_user_key(replace(rot, created_ms=3))
    # claiming another old key: the statement changes, so both signatures fail
    with pytest.raises(CryptoError, match="self-signature"):
        idn.verify_user_key(replace(rot, previous=BOB.public))
    with pytest.raises(CryptoError, match="previous_sig must be empty"):
        idn.verify_user_key(replace(ALICE.announce(1), previous_sig=bytes(64)))
    with pytest.raises(CryptoError, match="same user"):
        ALICE2.announce(2, rotated_from=BOB)


# --- the devices a client may encrypt to ----------------------------------------------------


def test_verified_devices_keeps_only_certified_unrevoked_devices() -> None:
    laptop_key = SigningKey(b"\x11" * 32)
    good, laptop = cert_for(), cert_for(device="d-laptop", signer=laptop_key)
    mallory = UserKeys.generate(I["user"])
    injected = cert_for(mallory, device="d-evil", signer=SigningKey(b"\x22" * 32))
    other_user = cert_for(BOB, device="d-bob")
    found = idn.verified_devices(I["user"], ALICE.public, [injected, laptop, good, other_user])
    assert [(d.device, d.ed25519) for d in found] == [
        ("d-laptop", bytes(laptop_key.verify_key)),
        (DEVICE, DEVICE_ED),
    ]
    assert found[1] == idn.VerifiedDevice(
        I["user"], DEVICE, DEVICE_ED, DEVICE_CURVE, I["created_ms"]
    )
    revoked = idn.verified_devices(
        I["user"], ALICE.public, [good, laptop], [ALICE.revoke("d-laptop", 9)]
    )
    assert [d.device for d in revoked] == [DEVICE]
    self_revoked = Revocation.by_own_device(DEVICE_KEY, I["user"], DEVICE, 9)
    left = idn.verified_devices(I["user"], ALICE.public, [good, laptop], [self_revoked])
    assert [d.device for d in left] == ["d-laptop"]


def test_revocations_that_do_not_verify_or_name_another_user_revoke_nothing() -> None:
    good = cert_for()
    ignored = [
        replace(ALICE.revoke(DEVICE, 9), sig=bytes(64)),
        BOB.revoke(DEVICE, 9),  # bob's key, over alice's device
        replace(BOB.revoke(DEVICE, 9), user=I["user"]),
        Revocation(I["contact"], DEVICE, 9, False, bytes(64)),
        # self-revocation by a key never certified for that device
        Revocation.by_own_device(SigningKey(b"\x33" * 32), I["user"], DEVICE, 9),
    ]
    found = idn.verified_devices(I["user"], ALICE.public, [good], ignored)
    assert [d.device for d in found] == [DEVICE]


def test_a_statement_naming_another_user_counts_for_nothing_even_under_the_right_key() -> None:
    """The same signing key used under another user id: its certificate and its revocation
    verify under alice's key but name someone else, so they neither add nor revoke a device of
    alice's."""
    alias = UserKeys("alice-alias", ALICE.signing)
    foreign = cert_for(alias, device="d-alias", signer=SigningKey(b"\x66" * 32))
    foreign.verify(ALICE.public)  # the signatures hold ...
    found = idn.verified_devices(
        I["user"], ALICE.public, [cert_for(), foreign], [alias.revoke(DEVICE, 9)]
    )
    assert [d.device for d in found] == [DEVICE]  # ... but they are not about alice


def test_of_several_certificates_for_one_device_the_newest_wins_and_a_tie_drops_it() -> None:
    old, new = cert_for(created_ms=1), cert_for(signer=SigningKey(b"\x44" * 32), created_ms=2)
    found = idn.verified_devices(I["user"], ALICE.public, [new, old])
    assert [d.ed25519 for d in found] == [new.ed25519]
    rival = cert_for(signer=SigningKey(b"\x55" * 32), created_ms=2)
    assert idn.verified_devices(I["user"], ALICE.public, [old, new, rival]) == []
    # the same certificate twice is no conflict
    assert len(idn.verified_devices(I["user"], ALICE.public, [new, new])) == 1


# --- safety numbers and the QR payload ------------------------------------------------------


def test_the_safety_number_is_60_digits_the_same_on_both_sides() -> None:
    V = committed()
    number = ct.safety_number(I["user"], ALICE.public, I["contact"], BOB.public)
    groups = number.split(" ")
    assert len(groups) == 12 and all(len(g) == 5 and g.isdigit() for g in groups)
    assert number == ct.safety_number(I["contact"], BOB.public, I["user"], ALICE.public)
    halves = {number.replace(" ", "")[:30], number.replace(" ", "")[30:]}
    assert halves == {V["digits_user"], V["digits_contact"]}


def test_the_safety_number_changes_with_either_key_or_user_id() -> None:
    number = ct.safety_number(I["user"], ALICE.public, I["contact"], BOB.public)
    assert number != ct.safety_number(I["user"], ALICE2.public, I["contact"], BOB.public)
    assert number != ct.safety_number("alicia", ALICE.public, I["contact"], BOB.public)
    with pytest.raises(CryptoError, match="user key"):
        ct.safety_number(I["user"], ALICE.public[:31], I["contact"], BOB.public)


def test_the_qr_payload_is_symmetric_and_matches_only_the_same_keys() -> None:
    mine = ct.verification_payload(I["user"], ALICE.public, I["contact"], BOB.public)
    assert mine == ct.verification_payload(I["contact"], BOB.public, I["user"], ALICE.public)
    assert ct.verification_matches(mine, I["contact"], BOB.public, I["user"], ALICE.public)
    assert not ct.verification_matches(mine, I["contact"], BOB.public, I["user"], ALICE2.public)
    assert not ct.verification_matches(mine, "carol", BOB.public, I["user"], ALICE.public)


def test_the_qr_pair_order_is_by_utf8_bytes() -> None:
    """'\uff61' sorts after '\U0001f600' in UTF-16 (JavaScript's order) but before in UTF-8."""
    low, high = "\uff61", "\U0001f600"
    payload = msgpack.unpackb(
        ct.verification_payload(high, BOB.public, low, ALICE.public), raw=False
    )
    assert payload[1] == low and payload[3] == high


# --- recovery backup ------------------------------------------------------------------------

OPS, MEM = nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN


def test_a_backup_restores_the_same_key_and_a_wrong_passphrase_does_not() -> None:
    keys = UserKeys.generate("carol")
    data = keys.backup("tulip river 42", opslimit=OPS, memlimit=MEM)
    restored = UserKeys.restore(data, "tulip river 42")
    assert (restored.user, restored.public) == ("carol", keys.public)
    assert data != keys.backup("tulip river 42", opslimit=OPS, memlimit=MEM)  # fresh salt and nonce
    with pytest.raises(CryptoError, match="wrong passphrase"):
        UserKeys.restore(data, "tulip river 43")


def test_the_passphrase_is_compared_in_nfc() -> None:
    data = ALICE.backup("caf\u00e9", opslimit=OPS, memlimit=MEM)
    assert UserKeys.restore(data, "cafe\u0301").public == ALICE.public


def test_a_damaged_or_foreign_backup_is_refused() -> None:
    V = committed()
    data = bytes.fromhex(V["backup"])
    outer = msgpack.unpackb(data, raw=False)
    box = outer["box"]
    cases = [
        {**outer, "box": box[:-1] + bytes([box[-1] ^ 1])},
        {**outer, "salt": bytes(16)},
        {**outer, "magic": "rt-device-keys-v1"},
        {**outer, "mem": nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE * 2},  # refused before Argon2
        {**outer, "ops": 0},
        {**outer, "ops": True},
        {**outer, "salt": b"short"},
        {k: v for k, v in outer.items() if k != "box"},
    ]
    for case in cases:
        with pytest.raises(CryptoError):
            UserKeys.restore(pack(case), I["passphrase"])
    for garbage in (b"", b"\xc1", pack([1, 2]), pack("x")):
        with pytest.raises(CryptoError):
            UserKeys.restore(garbage, I["passphrase"])


def test_backup_refuses_limits_a_restore_would_refuse() -> None:
    with pytest.raises(CryptoError, match="limits"):
        ALICE.backup("x", opslimit=0, memlimit=MEM)


# --- the contact book -----------------------------------------------------------------------


def test_first_sight_is_trusted_and_the_same_key_again_is_no_event() -> None:
    book = ContactBook()
    assert book.state("bob") is None and not book.may_share("bob")
    assert book.observe("bob", BOB.public) is None
    assert book.state("bob") == "unverified" and book.may_share("bob")
    assert book.observe("bob", BOB.public) is None
    assert book.key("bob") == BOB.public


def test_an_unverified_contacts_reset_is_accepted_with_an_event_by_default() -> None:
    book = ContactBook()
    book.observe("bob", BOB.public)
    new = UserKeys.generate("bob")
    change = book.observe("bob", new.public)
    assert change == ct.Change("bob", BOB.public, new.public, False, "reset", False)
    assert book.key("bob") == new.public and book.may_share("bob")


def test_the_block_policy_blocks_an_unverified_contacts_reset() -> None:
    book = ContactBook(on_unverified_change="block")
    book.observe("bob", BOB.public)
    new = UserKeys.generate("bob")
    change = book.observe("bob", new.public)
    assert change is not None and change.blocked and not change.was_verified
    assert book.state("bob") == "blocked" and not book.may_share("bob")
    assert book.key("bob") == BOB.public and book.pending("bob") == new.public


def test_a_verified_contacts_reset_blocks_until_the_app_confirms() -> None:
    book = ContactBook()
    book.observe("bob", BOB.public)
    book.verify("bob", BOB.public)
    assert book.state("bob") == "verified"
    new = UserKeys.generate("bob")
    change = book.observe("bob", new.public)
    assert change == ct.Change("bob", BOB.public, new.public, True, "reset", True)
    assert not book.may_share("bob") and book.key("bob") == BOB.public
    assert book.observe("bob", new.public) is None  # reported once
    with pytest.raises(CryptoError, match="no pending change"):
        book.confirm("bob", BOB.public)
    book.confirm("bob", new.public)
    assert book.state("bob") == "unverified" and book.may_share("bob")
    assert book.key("bob") == new.public
    with pytest.raises(CryptoError, match="no pending change"):
        book.confirm("bob", new.public)


def test_verifying_the_pending_key_confirms_it_and_a_stranger_key_is_refused() -> None:
    book = ContactBook()
    book.verify("bob", BOB.public)  # verified in person before the directory showed it
    new = UserKeys.generate("bob")
    book.observe("bob", new.public)
    with pytest.raises(CryptoError, match="not the one on record"):
        book.verify("bob", UserKeys.generate("bob").public)
    book.verify("bob", new.public)
    assert book.state("bob") == "verified" and book.key("bob") == new.public


def test_another_key_while_blocked_is_a_new_event_and_stays_blocked() -> None:
    book = ContactBook()
    book.verify("bob", BOB.public)
    first, second = UserKeys.generate("bob"), UserKeys.generate("bob")
    book.observe("bob", first.public)
    change = book.observe("bob", second.public)
    assert change is not None and change.blocked and change.new == second.public
    assert book.pending("bob") == second.public and book.key("bob") == BOB.public


def test_a_rotation_signed_by_the_old_key_is_accepted_and_keeps_verification() -> None:
    book = ContactBook()
    book.verify("alice", ALICE.public)
    rot = ALICE2.announce(2, rotated_from=ALICE)
    change = book.observe("alice", ALICE2.public, [rot])
    assert change == ct.Change("alice", ALICE.public, ALICE2.public, True, "rotation", False)
    assert book.state("alice") == "verified" and book.key("alice") == ALICE2.public
    # two rotations in a row, both in the chain
    third = UserKeys.generate("alice")
    chain = [third.announce(3, rotated_from=ALICE2)]
    assert book.observe("alice", third.public, chain) is not None
    assert book.state("alice") == "verified"
    book2 = ContactBook()
    book2.verify("alice", ALICE.public)
    change = book2.observe("alice", third.public, [rot, *chain])
    assert change is not None and change.kind == "rotation" and book2.may_share("alice")


def test_a_rotation_chain_that_does_not_hold_is_a_reset() -> None:
    third = UserKeys.generate("alice")
    rot = ALICE2.announce(2, rotated_from=ALICE)
    bad_chains: list[list[UserKeyStatement]] = [
        [replace(rot, previous_sig=bytes(64))],  # old key's signature forged
        [third.announce(3, rotated_from=ALICE2)],  # does not start at the key on record
        [rot],  # ends at ALICE2, not at the key observed (third)
        [ALICE2.announce(2)],  # self-signed only: a reset
        [replace(rot, user="bob")],
    ]
    for chain in bad_chains:
        book = ContactBook()
        book.verify("alice", ALICE.public)
        change = book.observe("alice", third.public, chain)
        assert change is not None and change.kind == "reset" and change.blocked, chain
        assert not book.may_share("alice")


def test_a_rotation_signed_by_the_old_key_but_for_another_user_id_is_a_reset() -> None:
    alias_old, alias_new = UserKeys("mallory", ALICE.signing), UserKeys.generate("mallory")
    chain = [alias_new.announce(2, rotated_from=alias_old)]
    idn.verify_user_key(chain[0])  # a valid statement, about "mallory"
    book = ContactBook()
    book.verify("alice", ALICE.public)
    change = book.observe("alice", alias_new.public, chain)
    assert change is not None and change.kind == "reset" and not book.may_share("alice")


def test_a_book_blocked_under_the_block_policy_stays_blocked_when_reloaded_with_accept() -> None:
    strict = ContactBook(on_unverified_change="block")
    strict.observe("bob", BOB.public)
    first, second = UserKeys.generate("bob"), UserKeys.generate("bob")
    strict.observe("bob", first.public)
    lenient = ContactBook.from_bytes(strict.to_bytes(), on_unverified_change="accept")
    change = lenient.observe("bob", second.public)
    assert change is not None and change.blocked
    assert lenient.state("bob") == "blocked" and lenient.key("bob") == BOB.public


def test_the_book_survives_persistence_with_every_state() -> None:
    book = ContactBook()
    book.observe("bob", BOB.public)
    book.verify("alice", ALICE.public)
    book.verify("carol", UserKeys.generate("carol").public)
    book.observe("carol", ALICE2.public)
    again = ContactBook.from_bytes(book.to_bytes())
    for user in ("alice", "bob", "carol", "dave"):
        assert (again.state(user), again.key(user), again.pending(user)) == (
            book.state(user),
            book.key(user),
            book.pending(user),
        )
    assert again.to_bytes() == book.to_bytes()
    for garbage in (b"", pack(["rt.v2.other", []]), pack(["rt.v2.contacts", [["bob", b"x", 1]]])):
        with pytest.raises(CryptoError):
            ContactBook.from_bytes(garbage)
    with pytest.raises(ValueError):
        ContactBook(on_unverified_change=cast(Any, "ignore"))


KEYS = [bytes(SigningKey(bytes([n]) * 32).verify_key) for n in range(1, 5)]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["observe", "verify", "confirm"]), st.integers(0, 3)),
        max_size=12,
    ),
    policy=st.sampled_from(["accept", "block"]),
)
def test_a_verified_contact_is_never_shared_with_under_an_unconfirmed_key(
    steps: list[tuple[str, int]], policy: Any
) -> None:
    """Whatever the sequence, sharing is allowed only under a key the book has accepted: the
    first one seen, one the app verified or confirmed, or (accept policy) an unverified
    contact's reset; never a reset of a verified contact."""
    book = ContactBook(on_unverified_change=policy)
    accepted: set[bytes] = set()
    for op, n in steps:
        key = KEYS[n]
        was_verified = book.state("bob") in ("verified", "blocked")
        try:
            if op == "observe":
                known = book.state("bob") is not None
                book.observe("bob", key)
                if not known or (policy == "accept" and not was_verified):
                    accepted.add(key)
            elif op == "verify":
                book.verify("bob", key)
                accepted.add(key)
            else:
                book.confirm("bob", key)
                accepted.add(key)
        except CryptoError:
            pass
        if book.may_share("bob"):
            assert book.key("bob") in accepted


if __name__ == "__main__":
    json.dump(make(INPUTS), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


def test_the_contact_book_names_the_bad_argument() -> None:
    """Verifying with a user that is not a string, or a key of the wrong size, says which."""
    book = ct.ContactBook()
    with pytest.raises(CryptoError, match=r"^user must be a non-empty string$"):
        book.verify("", bytes(32))
    with pytest.raises(CryptoError, match=r"^user key must be 32 bytes"):
        book.verify("ivy", bytes(31))


def test_a_revocation_that_does_not_verify_says_which_signature() -> None:
    ivy = UserKeys.generate("ivy")
    revocation = ivy.revoke("d-old", 5)
    with pytest.raises(CryptoError, match=r"^revocation signature \(user key\)"):
        idn.verify_revocation(revocation, UserKeys.generate("ivy").public)
