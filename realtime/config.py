"""Settings read from the environment, validated once at start-up.

Every variable is documented in the README's configuration table. A bad value raises
`ConfigError` with a one-line message that the CLI prints instead of a traceback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from realtime_safety.alerts.providers import APNS_LEVELS
from realtime_safety.storage import StoreConfig

from .overload import OverloadLimits


class ConfigError(Exception):
    """A configuration problem, explained in one line."""


_ASYMMETRIC = {"EdDSA", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256"}
_SYMMETRIC = {"HS256", "HS384", "HS512"}


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = 128 * 1024
    auth_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 40.0
    send_queue_frames: int = 1024
    rate_per_s: float = 50.0
    rate_burst: int = 100
    max_subscriptions: int = 500
    recovery_limit: int = 1000
    max_body_bytes: int = 64 * 1024
    max_connections_per_user: int = 50  # per node
    handshake_timeout_s: float = 10.0  # TCP accept -> complete HTTP request head


@dataclass(frozen=True, slots=True)
class Settings:
    jwt_key: str | bytes
    jwt_algorithms: tuple[str, ...]
    redis_url: str | None
    mongodb_uri: str | None
    mongodb_db: str
    data_dir: Path
    node_id: str
    api_key: str | None
    plaintext_namespaces: frozenset[str]
    store_timeout_s: float = 5.0
    mongodb_write_concern: str | int = "majority"
    mongodb_journal: bool = True
    # Days to keep messages per namespace; a namespace not listed keeps them forever.
    retention_days: dict[str, float] = field(default_factory=dict)
    retention_interval_s: float = 3600.0
    franking_key: bytes = b""
    presence_heartbeat_s: float = 5.0
    presence_node_timeout_s: float = 15.0
    fcm_credentials: str | None = None
    fcm_endpoint: str | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_from: str | None = None
    twilio_base_url: str | None = None
    public_url: str | None = None
    log_format: str = "text"
    alert_escalate_s: float = 120.0
    responder_radius_m: float = 2000.0
    responder_ttl_s: float = 900.0
    alert_trail_days: float = 30.0
    alert_trigger_limit: int = 5
    alert_retry_base_s: float = 1.0
    alert_lease_s: float = 30.0
    alert_reconcile_s: float = 10.0
    alert_provider_timeout_s: float = 10.0
    alert_fallback_s: float = 30.0
    alert_fallback_tier_s: tuple[tuple[int, float], ...] = ()  # (tier, seconds): a tier's own
    alert_apns_level: str = "time-sensitive"
    alert_max_delay_s: float = 60.0
    alert_pin_attempts: int = 5
    pin_pepper: bytes = b""
    kt_signing_seed: bytes | None = None  # the key log's Ed25519 seed; None: kept in the store
    checkin_max_s: float = 86400.0
    checkin_limit: int = 3
    ws_deflate: bool = False
    presence_push_limit: int = 200
    # who may see a user's online status (`user:<id>` presence): "related" (themself, room
    # mates, their emergency contacts, moderators) or "everyone" (the old behaviour)
    presence_visibility: str = "related"
    log_client_ips: bool = False  # client addresses in log lines (RT_LOG_CLIENT_IPS=1)
    limits: Limits = field(default_factory=Limits)
    overload: OverloadLimits = field(default_factory=OverloadLimits)

    @property
    def broker_kind(self) -> str:
        return "redis" if self.redis_url else "in-process"

    @property
    def store(self) -> StoreConfig:
        """What the storage layer needs of these settings."""
        return StoreConfig(
            data_dir=self.data_dir,
            mongodb_uri=self.mongodb_uri,
            mongodb_db=self.mongodb_db,
            timeout_s=self.store_timeout_s,
            write_concern=self.mongodb_write_concern,
            journal=self.mongodb_journal,
        )

    @property
    def store_kind(self) -> str:
        return "mongodb" if self.mongodb_uri else "sqlite"


def _read_secret(env: Mapping[str, str], name: str) -> str | None:
    """`NAME` holds the value itself; `NAME_FILE` names a file that holds it."""
    value = env.get(name)
    path = env.get(f"{name}_FILE")
    if value and path:
        raise ConfigError(f"set only one of {name} and {name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    return value or None


def _kt_signing_seed(env: Mapping[str, str]) -> bytes | None:
    """RT_KT_SIGNING_KEY (64 hex digits) or RT_KT_SIGNING_KEY_FILE (32 raw bytes or 64 hex
    digits): the key transparency log's Ed25519 seed, the same on every node."""
    value, path = env.get("RT_KT_SIGNING_KEY"), env.get("RT_KT_SIGNING_KEY_FILE")
    if value and path:
        raise ConfigError("set only one of RT_KT_SIGNING_KEY and RT_KT_SIGNING_KEY_FILE")
    if path:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"RT_KT_SIGNING_KEY_FILE: cannot read {path}: {exc.strerror}"
            ) from None
        if len(data) == 32:
            return data
        value = data.decode("ascii", "replace").strip()
    if not value:
        return None
    try:
        seed = bytes.fromhex(value)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ConfigError("RT_KT_SIGNING_KEY must be a 32-byte seed: raw (in the file) or hex")
    return seed


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return value


def _fallback(env: Mapping[str, str]) -> tuple[float, tuple[tuple[int, float], ...]]:
    """RT_ALERT_FALLBACK_S: seconds for every tier, then `tier:seconds` for a tier's own delay
    (0: no fallback for that tier), e.g. `30,2:120,3:0`."""
    name, raw = "RT_ALERT_FALLBACK_S", env.get("RT_ALERT_FALLBACK_S", "")
    default, tiers = 30.0, {}
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        tier, sep, seconds = part.rpartition(":")
        try:
            value = float(seconds)
            if sep:
                if not tier.isdigit() or int(tier) < 1 or value < 0:
                    raise ValueError
                tiers[int(tier)] = value
            elif value <= 0:
                raise ValueError
            else:
                default = value
        except ValueError:
            raise ConfigError(
                f"{name} must be seconds, then tier:seconds for a tier's own, "
                f"e.g. '30,2:120' (got {raw!r})"
            ) from None
    return default, tuple(sorted(tiers.items()))


def load(env: Mapping[str, str] | None = None, *, need_token_key: bool = True) -> Settings:
    """Settings from `env` (default: the process environment). `need_token_key=False` is for
    commands that verify no tokens (export, import)."""
    env = os.environ if env is None else env

    secret = _read_secret(env, "RT_JWT_SECRET")
    public_key = _read_secret(env, "RT_JWT_PUBLIC_KEY")
    algorithms_raw = env.get("RT_JWT_ALGORITHMS", "")
    algorithms = tuple(a.strip() for a in algorithms_raw.split(",") if a.strip())
    key: str | bytes
    if secret and public_key:
        raise ConfigError("set only one of RT_JWT_SECRET and RT_JWT_PUBLIC_KEY")
    if public_key:
        if "BEGIN" not in public_key:
            raise ConfigError("RT_JWT_PUBLIC_KEY must be a PEM public key (or use _FILE)")
        algorithms = algorithms or ("EdDSA", "ES256", "RS256")
        bad = [a for a in algorithms if a not in _ASYMMETRIC]
        if bad:
            raise ConfigError(f"RT_JWT_ALGORITHMS: {bad[0]} cannot be used with a public key")
        key = public_key
    elif secret:
        if len(secret) < 32:
            raise ConfigError("RT_JWT_SECRET must be at least 32 characters")
        algorithms = algorithms or ("HS256",)
        bad = [a for a in algorithms if a not in _SYMMETRIC]
        if bad:
            raise ConfigError(f"RT_JWT_ALGORITHMS: {bad[0]} cannot be used with RT_JWT_SECRET")
        key = secret
    elif not need_token_key:
        key, algorithms = "", ()
    else:
        raise ConfigError(
            "no token key: set RT_JWT_SECRET (HS256, 32+ chars) or RT_JWT_PUBLIC_KEY "
            "(try: export RT_JWT_SECRET=$(python -c 'import secrets;print(secrets.token_hex(32))'))"
        )

    redis_url = env.get("RT_REDIS_URL") or None
    mongodb_uri = _read_secret(env, "RT_MONGODB_URI")
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"RT_REDIS_URL must start with redis://, rediss:// or unix://: {redis_url}"
        )
    if mongodb_uri and not mongodb_uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError("RT_MONGODB_URI must start with mongodb:// or mongodb+srv://")
    if redis_url and not mongodb_uri:
        raise ConfigError(
            "RT_REDIS_URL is set but RT_MONGODB_URI is not: nodes sharing Redis must share "
            "MongoDB too, or each node would keep its own history and sequences"
        )

    data_dir = Path(env.get("RT_DATA_DIR") or "./data").expanduser()
    node_id = env.get("RT_NODE_ID") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    if not all(c.isalnum() or c in "-_." for c in node_id) or len(node_id) > 64:
        raise ConfigError("RT_NODE_ID must be 1-64 characters of [A-Za-z0-9._-]")

    api_key = _read_secret(env, "RT_API_KEY")
    if api_key is not None and len(api_key) < 16:
        raise ConfigError("RT_API_KEY must be at least 16 characters")

    plain = env.get("RT_PLAINTEXT_NAMESPACES", "public")
    plaintext_namespaces = frozenset(n.strip().rstrip(":") for n in plain.split(",") if n.strip())

    limits = Limits(
        max_frame_bytes=int(_number(env, "RT_MAX_FRAME_BYTES", 128 * 1024, integer=True)),
        auth_timeout_s=_number(env, "RT_AUTH_TIMEOUT_S", 10.0),
        ping_interval_s=_number(env, "RT_PING_INTERVAL_S", 20.0),
        ping_timeout_s=_number(env, "RT_PING_TIMEOUT_S", 40.0),
        send_queue_frames=int(_number(env, "RT_SEND_QUEUE_FRAMES", 1024, integer=True)),
        rate_per_s=_number(env, "RT_RATE_PER_S", 50.0),
        rate_burst=int(_number(env, "RT_RATE_BURST", 100, integer=True)),
        max_subscriptions=int(_number(env, "RT_MAX_SUBSCRIPTIONS", 500, integer=True)),
        recovery_limit=int(_number(env, "RT_RECOVERY_LIMIT", 1000, integer=True)),
        max_body_bytes=int(_number(env, "RT_MAX_BODY_BYTES", 64 * 1024, integer=True)),
        max_connections_per_user=int(_number(env, "RT_MAX_CONNECTIONS_PER_USER", 50, integer=True)),
        handshake_timeout_s=_number(env, "RT_HANDSHAKE_TIMEOUT_S", 10.0),
    )
    if limits.max_body_bytes >= limits.max_frame_bytes:
        raise ConfigError("RT_MAX_BODY_BYTES must be smaller than RT_MAX_FRAME_BYTES")

    wc_raw = env.get("RT_MONGODB_WRITE_CONCERN") or "majority"
    write_concern: str | int = wc_raw
    if wc_raw != "majority":
        if not wc_raw.isdigit() or int(wc_raw) < 1:
            raise ConfigError(
                "RT_MONGODB_WRITE_CONCERN must be 'majority' or a number of members >= 1 "
                "(0 would acknowledge writes that may be lost)"
            )
        write_concern = int(wc_raw)
    journal_raw = (env.get("RT_MONGODB_JOURNAL") or "true").lower()
    if journal_raw not in ("true", "false", "1", "0"):
        raise ConfigError("RT_MONGODB_JOURNAL must be true or false")

    franking_raw = _read_secret(env, "RT_FRANKING_KEY")
    if franking_raw is not None:
        if len(franking_raw) < 32:
            raise ConfigError("RT_FRANKING_KEY must be at least 32 characters")
        franking_key = hashlib.sha256(b"rt-franking:" + franking_raw.encode()).digest()
    elif secret:
        franking_key = hashlib.sha256(b"rt-franking:" + secret.encode()).digest()
    elif need_token_key:
        raise ConfigError(
            "RT_FRANKING_KEY is required with RT_JWT_PUBLIC_KEY (the same on every node): "
            "it keys the tags that make abuse reports verifiable"
        )
    else:
        franking_key = b""

    log_format = (env.get("RT_LOG_FORMAT") or "text").lower()
    presence_visibility = (env.get("RT_PRESENCE_VISIBILITY") or "related").lower()
    if presence_visibility not in ("related", "everyone"):
        raise ConfigError("RT_PRESENCE_VISIBILITY must be related or everyone")
    if log_format not in ("text", "json"):
        raise ConfigError(f"RT_LOG_FORMAT must be text or json, got {env['RT_LOG_FORMAT']!r}")
    heartbeat = _number(env, "RT_PRESENCE_HEARTBEAT_S", 5.0)
    alert_lease = _number(env, "RT_ALERT_LEASE_S", 30.0)
    provider_timeout = _number(env, "RT_ALERT_PROVIDER_TIMEOUT_S", 10.0)
    if alert_lease < 2 * provider_timeout:
        # A job still waiting on its provider must not be reclaimed by another worker.
        raise ConfigError(
            "RT_ALERT_LEASE_S must be at least twice RT_ALERT_PROVIDER_TIMEOUT_S "
            f"({alert_lease:g} < 2 x {provider_timeout:g})"
        )
    node_timeout = _number(env, "RT_PRESENCE_NODE_TIMEOUT_S", 15.0)
    if node_timeout < 2 * heartbeat:
        raise ConfigError(
            "RT_PRESENCE_NODE_TIMEOUT_S must be at least twice RT_PRESENCE_HEARTBEAT_S"
        )

    apns_level = env.get("RT_ALERT_APNS_LEVEL") or "time-sensitive"
    if apns_level not in APNS_LEVELS:
        raise ConfigError(f"RT_ALERT_APNS_LEVEL must be one of {', '.join(APNS_LEVELS)}")

    fcm_credentials = env.get("RT_FCM_CREDENTIALS") or None
    if fcm_credentials and not Path(fcm_credentials).is_file():
        raise ConfigError(f"RT_FCM_CREDENTIALS: no service-account file at {fcm_credentials}")
    twilio_sid = env.get("RT_TWILIO_ACCOUNT_SID") or None
    twilio_token = _read_secret(env, "RT_TWILIO_AUTH_TOKEN")
    twilio_from = env.get("RT_TWILIO_FROM") or None
    if twilio_sid and not (twilio_token and twilio_from):
        raise ConfigError("RT_TWILIO_ACCOUNT_SID needs RT_TWILIO_AUTH_TOKEN and RT_TWILIO_FROM")
    for name in ("RT_FCM_ENDPOINT", "RT_TWILIO_BASE_URL", "RT_PUBLIC_URL"):
        value = env.get(name)
        if value and not value.startswith(("http://", "https://")):
            raise ConfigError(f"{name} must be an http(s) URL")

    fallback_s, fallback_tiers = _fallback(env)
    return Settings(
        jwt_key=key,
        jwt_algorithms=algorithms,
        redis_url=redis_url,
        mongodb_uri=mongodb_uri,
        mongodb_db=env.get("RT_MONGODB_DB") or "realtime",
        data_dir=data_dir,
        node_id=node_id,
        api_key=api_key,
        plaintext_namespaces=plaintext_namespaces,
        store_timeout_s=_number(env, "RT_STORE_TIMEOUT_S", 5.0),
        mongodb_write_concern=write_concern,
        mongodb_journal=journal_raw in ("true", "1"),
        retention_days=_retention(env.get("RT_RETENTION", "")),
        retention_interval_s=_number(env, "RT_RETENTION_INTERVAL_S", 3600.0),
        franking_key=franking_key,
        kt_signing_seed=_kt_signing_seed(env),
        fcm_credentials=fcm_credentials,
        fcm_endpoint=env.get("RT_FCM_ENDPOINT") or None,
        twilio_account_sid=twilio_sid,
        twilio_auth_token=twilio_token,
        twilio_from=twilio_from,
        twilio_base_url=env.get("RT_TWILIO_BASE_URL") or None,
        public_url=env.get("RT_PUBLIC_URL") or None,
        log_format=log_format,
        alert_escalate_s=_number(env, "RT_ALERT_ESCALATE_S", 120.0),
        responder_radius_m=_number(env, "RT_RESPONDER_RADIUS_M", 2000.0),
        responder_ttl_s=_number(env, "RT_RESPONDER_TTL_S", 900.0),
        alert_trail_days=_number(env, "RT_ALERT_TRAIL_DAYS", 30.0),
        alert_trigger_limit=int(_number(env, "RT_ALERT_TRIGGER_LIMIT", 5, integer=True)),
        alert_retry_base_s=_number(env, "RT_ALERT_RETRY_BASE_S", 1.0),
        alert_lease_s=alert_lease,
        alert_reconcile_s=_number(env, "RT_ALERT_RECONCILE_S", 10.0),
        alert_provider_timeout_s=provider_timeout,
        alert_fallback_s=fallback_s,
        alert_fallback_tier_s=fallback_tiers,
        alert_apns_level=apns_level,
        alert_max_delay_s=_number(env, "RT_ALERT_MAX_DELAY_S", 60.0),
        alert_pin_attempts=int(_number(env, "RT_ALERT_PIN_ATTEMPTS", 5, integer=True)),
        # PIN hashes are peppered with a key every node shares (changing it voids stored PINs)
        pin_pepper=hashlib.sha256(b"rt-pin:" + franking_key).digest() if franking_key else b"",
        checkin_max_s=_number(env, "RT_CHECKIN_MAX_S", 86400.0),
        checkin_limit=int(_number(env, "RT_CHECKIN_LIMIT", 3, integer=True)),
        ws_deflate=(env.get("RT_WS_DEFLATE") or "false").lower() in ("1", "true"),
        presence_push_limit=int(_number(env, "RT_PRESENCE_PUSH_LIMIT", 200, integer=True)),
        presence_visibility=presence_visibility,
        log_client_ips=(env.get("RT_LOG_CLIENT_IPS") or "0").lower() in ("1", "true"),
        presence_heartbeat_s=heartbeat,
        presence_node_timeout_s=node_timeout,
        limits=limits,
        overload=OverloadLimits(
            lag_s=_number(env, "RT_OVERLOAD_LAG_MS", 25.0) / 1000,
            queued_frames=int(_number(env, "RT_OVERLOAD_QUEUED_FRAMES", 200_000, integer=True)),
            backend_calls=int(_number(env, "RT_OVERLOAD_BACKEND_CALLS", 2_000, integer=True)),
            backend_latency_s=_number(env, "RT_OVERLOAD_BACKEND_MS", 50.0) / 1000,
            cool_s=_number(env, "RT_OVERLOAD_COOL_S", 1.0),
        ),
    )


def _retention(raw: str) -> dict[str, float]:
    """`room=forever,public=30d,user=90` -> {"public": 30.0, "user": 90.0}."""
    from realtime_safety.channels.names import NAMESPACES

    days: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        namespace, sep, value = item.partition("=")
        namespace = namespace.strip().rstrip(":")
        value = value.strip().lower().removesuffix("d")
        if not sep or namespace not in NAMESPACES:
            raise ConfigError(
                f"RT_RETENTION: {item!r} must be namespace=DAYSd or namespace=forever "
                f"with a namespace among {', '.join(sorted(NAMESPACES))}"
            )
        if value == "forever":
            days.pop(namespace, None)
            continue
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"RT_RETENTION: {item!r}: days must be a number") from None
        if number <= 0:
            raise ConfigError(f"RT_RETENTION: {item!r}: days must be positive")
        days[namespace] = number
    return days
