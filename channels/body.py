"""Message bodies (docs/protocol-v1.md section 5): the end-to-end encrypted envelope, or a plaintext
body where the namespace allows it. The server checks shape and sizes and keeps exactly the
envelope's fields; it never sees chat plaintext in encrypted namespaces.

Beyond the shapes checked here, `crypto.directory.KeyDirectory` verifies `sig` against the
sending device's registered key before anything is stored. An envelope may carry `frank`, the
sender's franking commitment; the server adds `ftag`, its tag binding that commitment to the
sender, channel and time.
"""

from __future__ import annotations

from typing import Any

from realtime_safety.protocol import Codec, ProtocolError

ALG_ENVELOPE = "xchacha20poly1305"
ALG_MEGOLM = "megolm.v1"  # the v2 envelope (docs/e2ee/messages.md)
V2_FIELDS = frozenset({"v", "alg", "device", "session", "index", "ts", "mm", "sig", "frank"})
V2_BYTES = ("mm", "sig", "frank")
ALG_PLAIN = "none"
NONCE_BYTES = 24
SIG_BYTES = 64
FRANK_BYTES = 32  # HMAC-SHA256 franking commitment (optional)


def _short_str(value: object, name: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise ProtocolError("bad_request", f"body.{name} must be a string of 1-64 characters")
    return value


def parse_body(
    raw: object, codec: Codec, *, plaintext_allowed: bool, max_bytes: int
) -> dict[str, Any]:
    """The canonical stored form of a body (bytes as `bytes`), or a `bad_request`/`too_large`/
    `forbidden` error."""
    if not isinstance(raw, dict):
        raise ProtocolError("bad_request", "'body' must be an object")
    if raw.get("v") == 2 and raw.get("alg") == ALG_MEGOLM:
        return _v2_body(raw, codec, max_bytes)
    if raw.get("v") != 1:
        raise ProtocolError("bad_request", "body.v must be 1 (or 2 with alg megolm.v1)")
    alg = raw.get("alg")
    if alg == ALG_PLAIN:
        if not plaintext_allowed:
            raise ProtocolError("forbidden", "plaintext bodies are not allowed in this namespace")
        text = raw.get("text")
        if not isinstance(text, str):
            raise ProtocolError("bad_request", "body.text must be a string")
        if len(text.encode()) > max_bytes:
            raise ProtocolError("too_large", f"body.text is over {max_bytes} bytes")
        return {"v": 1, "alg": ALG_PLAIN, "text": text}
    if alg != ALG_ENVELOPE:
        raise ProtocolError("bad_request", f"body.alg must be {ALG_ENVELOPE!r} or {ALG_PLAIN!r}")
    device = _short_str(raw.get("device"), "device")
    key_id = _short_str(raw.get("key_id"), "key_id")
    nonce = codec.bytes_field(raw.get("nonce"))
    ct = codec.bytes_field(raw.get("ct"))
    sig = codec.bytes_field(raw.get("sig"))
    if nonce is None or len(nonce) != NONCE_BYTES:
        raise ProtocolError("bad_request", f"body.nonce must be {NONCE_BYTES} bytes")
    if sig is None or len(sig) != SIG_BYTES:
        raise ProtocolError("bad_request", f"body.sig must be {SIG_BYTES} bytes")
    if ct is None or not ct:
        raise ProtocolError("bad_request", "body.ct must be non-empty bytes")
    if len(ct) > max_bytes:
        raise ProtocolError("too_large", f"body.ct is over {max_bytes} bytes")
    body: dict[str, Any] = {
        "v": 1,
        "alg": ALG_ENVELOPE,
        "device": device,
        "key_id": key_id,
        "nonce": nonce,
        "ct": ct,
        "sig": sig,
    }
    if raw.get("frank") is not None:
        frank = codec.bytes_field(raw.get("frank"))
        if frank is None or len(frank) != FRANK_BYTES:
            raise ProtocolError("bad_request", f"body.frank must be {FRANK_BYTES} bytes")
        body["frank"] = frank
    return body


def _v2_body(raw: dict[str, Any], codec: Codec, max_bytes: int) -> dict[str, Any]:
    """A v2 envelope with its byte fields as bytes. Only the shape the server needs is checked
    here (exactly the envelope's fields, `device`, sizes); `crypto.envelope.server_verify_v2`
    checks the rest, with the sender device's key, before anything is stored."""
    if set(raw) != V2_FIELDS:
        raise ProtocolError("bad_request", f"a v2 body has exactly {', '.join(sorted(V2_FIELDS))}")
    body = dict(raw)
    body["device"] = _short_str(raw["device"], "device")
    for name in V2_BYTES:
        data = codec.bytes_field(raw[name])
        if data is None:
            raise ProtocolError("bad_request", f"body.{name} must be bytes")
        body[name] = data
    if len(body["mm"]) > max_bytes:
        raise ProtocolError("too_large", f"body.mm is over {max_bytes} bytes")
    return body
