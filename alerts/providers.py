"""Push (FCM through firebase-admin) and SMS (Twilio through its SDK), or an outbox file when a
node has no credentials, so the embedded default works with no accounts."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("realtime.alerts")


class ProviderError(Exception):
    """A send that failed; `permanent` means retrying cannot help; `retry_after_s` is the
    provider's own hint (HTTP Retry-After on a 429 or 5xx), honoured by the retry."""

    def __init__(
        self, message: str, *, permanent: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after_s = retry_after_s


def retry_after(headers: Any) -> float | None:
    """Seconds from an HTTP Retry-After header (delta-seconds or an HTTP date), if any."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = str(value).strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - datetime.datetime.now(datetime.UTC).timestamp())


@dataclass(frozen=True)
class PushResult:
    token: str
    ok: bool
    unregistered: bool = False  # prune this token
    error: str | None = None
    retry_after_s: float | None = None


def _headers(error: object) -> Any:
    response = getattr(error, "http_response", None)
    return getattr(response, "headers", None)


APNS_LEVELS = ("active", "time-sensitive", "critical")


@dataclass(frozen=True)
class Notice:
    """What the phone shows on its own (iOS shows the APNs alert without the app): a title, a
    body and the APNs interruption level, one of APNS_LEVELS (`time-sensitive` needs the app's
    Time Sensitive Notifications capability, `critical` Apple's critical-alerts entitlement;
    without them iOS shows the notice at the `active` level)."""

    title: str
    body: str
    level: str = "active"


class PushProvider(Protocol):
    name: str
    outbox: bool  # True: nothing leaves the node (no credentials)

    async def send(
        self,
        tokens: list[str],
        data: dict[str, str],
        collapse_key: str,
        ttl_s: int,
        notice: Notice,
    ) -> list[PushResult]: ...

    async def close(self) -> None: ...


class SmsProvider(Protocol):
    name: str
    outbox: bool

    async def send(self, to: str, body: str, status_callback: str | None) -> str:
        """The provider's message id."""
        ...

    async def close(self) -> None: ...


def apply_fcm_endpoint(endpoint: str) -> None:
    """firebase-admin has no public setting for the FCM address; this is the one place where
    ours (RT_FCM_ENDPOINT) is applied, before the app is initialised. The attribute is checked
    so that an SDK upgrade that drops it fails loudly instead of sending elsewhere."""
    from firebase_admin import messaging

    service = messaging._MessagingService
    if not isinstance(getattr(service, "FCM_URL", None), str):
        raise RuntimeError(
            "firebase_admin.messaging._MessagingService.FCM_URL is gone: "
            "RT_FCM_ENDPOINT cannot be applied with this firebase-admin version"
        )
    service.FCM_URL = endpoint.rstrip("/") + "/v1/projects/{0}/messages:send"


def apns_config(collapse_key: str, ttl_s: int, notice: Notice) -> Any:
    """The APNs part of an FCM message: a visible alert (a background push is not delivered to
    an app the user swiped away, and may not be sent at priority 10), at the notice's
    interruption level; `critical` adds the critical sound, which plays through silent mode
    and Focus. `mutable-content` lets the app's notification service extension enrich it."""
    from firebase_admin import messaging

    if notice.level not in APNS_LEVELS:
        raise ValueError(f"APNs interruption level must be one of {', '.join(APNS_LEVELS)}")
    sound: Any = (
        messaging.CriticalSound("default", critical=True, volume=1.0)
        if notice.level == "critical"
        else "default"
    )
    return messaging.APNSConfig(
        headers={
            "apns-priority": "10",
            "apns-push-type": "alert",
            "apns-collapse-id": collapse_key[:64],
            "apns-expiration": str(int(datetime.datetime.now().timestamp()) + ttl_s),
        },
        payload=messaging.APNSPayload(
            aps=messaging.Aps(
                alert=messaging.ApsAlert(title=notice.title, body=notice.body),
                sound=sound,
                mutable_content=True,
                custom_data={"interruption-level": notice.level},
            )
        ),
    )


class FcmPush:
    name = "fcm"
    outbox = False

    def __init__(self, credentials_path: str, endpoint: str | None) -> None:
        import firebase_admin
        from firebase_admin import credentials

        if endpoint:
            apply_fcm_endpoint(endpoint)
        cred = credentials.Certificate(credentials_path)
        self._app = firebase_admin.initialize_app(
            cred, name=f"rt-{id(self)}", options={"httpTimeout": 10}
        )

    async def send(
        self,
        tokens: list[str],
        data: dict[str, str],
        collapse_key: str,
        ttl_s: int,
        notice: Notice,
    ) -> list[PushResult]:
        from firebase_admin import exceptions, messaging

        ttl = datetime.timedelta(seconds=ttl_s)
        # Android: a high-priority data message wakes the app (out of Doze) to show its own
        # full-screen notice; iOS: the APNs alert above, shown by the system.
        android = messaging.AndroidConfig(priority="high", ttl=ttl, collapse_key=collapse_key)
        apns = apns_config(collapse_key, ttl_s, notice)
        messages = [
            messaging.Message(token=token, data=data, android=android, apns=apns)
            for token in tokens
        ]
        try:
            batch = await messaging.send_each_async(messages, app=self._app)
        except exceptions.FirebaseError as exc:
            raise ProviderError(
                f"fcm: {exc.code}", retry_after_s=retry_after(_headers(exc))
            ) from None
        results = []
        for token, response in zip(tokens, batch.responses, strict=True):
            if response.success:
                results.append(PushResult(token, True))
                continue
            error = response.exception  # an invalid or expired token: prune it
            unregistered = isinstance(
                error, messaging.UnregisteredError | exceptions.InvalidArgumentError
            )
            results.append(
                PushResult(
                    token,
                    False,
                    unregistered=unregistered,
                    error=getattr(error, "code", type(error).__name__),
                    retry_after_s=retry_after(_headers(error)),
                )
            )
        return results

    async def close(self) -> None:
        import firebase_admin

        # delete_app closes the SDK's async HTTP client with asyncio.run(): not on our loop.
        await asyncio.to_thread(firebase_admin.delete_app, self._app)


class TwilioSms:
    name = "twilio"
    outbox = False

    def __init__(
        self, account_sid: str, auth_token: str, sender: str, base_url: str | None
    ) -> None:
        import twilio.http.async_http_client  # noqa: F401 (see _twilio_http_client)
        from twilio.rest import Client

        # Made (and its modules imported) now, not on the first SOS: that took 0.3 s.
        self._client = Client(account_sid, auth_token)
        if base_url:
            self._client.api.base_url = base_url.rstrip("/")
        self._messages = self._client.messages
        self._sender = sender
        self._http: Any = None

    def _connect(self) -> Any:
        """The SDK's async HTTP client is made on first use: its aiohttp session belongs to the
        event loop it is made on, which must be the loop that sends (the alert lane's)."""
        if self._http is None:
            self._http = self._client.http_client = _twilio_http_client()
        return self._messages

    async def send(self, to: str, body: str, status_callback: str | None) -> str:
        from twilio.base.exceptions import TwilioRestException

        try:
            message = await self._connect().create_async(
                to=to,
                from_=self._sender,
                body=body,
                **({"status_callback": status_callback} if status_callback else {}),
            )
        except ProviderError:
            raise
        except TwilioRestException as exc:
            # 4xx other than 429 will not get better by retrying (bad number, blocked, ...)
            permanent = 400 <= exc.status < 500 and exc.status != 429
            said = f": {exc.msg}" if getattr(exc, "msg", None) else ""  # Twilio's own words
            raise ProviderError(
                f"twilio: HTTP {exc.status} code {exc.code}{said}"[:300], permanent=permanent
            ) from None
        except (TimeoutError, OSError) as exc:
            raise ProviderError(f"twilio: {type(exc).__name__}") from None
        except Exception as exc:  # aiohttp errors and the like
            raise ProviderError(f"twilio: {type(exc).__name__}: {exc}") from None
        return str(message.sid)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def _twilio_http_client() -> Any:
    """twilio's aiohttp client, made to raise the provider's Retry-After hint with a 429 or
    5xx (the SDK's exception drops the headers). Its `timeout` is not applied by the SDK's
    async client: the delivery worker bounds every provider call itself. (TwilioSms imports
    this module when it is made: importing aiohttp takes 0.2 s.)"""
    from twilio.http.async_http_client import AsyncTwilioHttpClient

    class Client(AsyncTwilioHttpClient):  # type: ignore[misc]
        async def request(self, *args: Any, **kwargs: Any) -> Any:
            response = await super().request(*args, **kwargs)
            if response.status_code == 429 or response.status_code >= 500:
                raise ProviderError(
                    f"twilio: HTTP {response.status_code}",
                    retry_after_s=retry_after(response.headers),
                )
            return response

    return Client()


class _Outbox:
    """No credentials: deliveries are appended to RT_DATA_DIR/outbox.jsonl (development).
    Their status is `outbox`, never `sent`: nobody got them."""

    outbox = True
    VARIABLES = ""  # what to set to send for real

    def __init__(self, path: Path, route: str) -> None:
        # The start-up warning reads "... are written to the <name>".
        self.name = f"outbox ({path}); set {self.VARIABLES} to send them"
        self._path = path
        self._route = route
        self._lock = asyncio.Lock()
        self.count = 0

    async def _write(self, record: dict[str, Any]) -> None:
        self.count += 1
        line = json.dumps({"route": self._route, **record}) + "\n"
        async with self._lock:
            await asyncio.to_thread(self._append, line)

    def _append(self, line: str) -> None:
        # phone numbers, locations and notes: readable by the server's account only
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a", encoding="utf-8") as f:
            f.write(line)

    async def close(self) -> None:
        return None


class OutboxPush(_Outbox):
    VARIABLES = "RT_FCM_CREDENTIALS"

    def __init__(self, path: Path) -> None:
        super().__init__(path, "push")

    async def send(
        self,
        tokens: list[str],
        data: dict[str, str],
        collapse_key: str,
        ttl_s: int,
        notice: Notice,
    ) -> list[PushResult]:
        await self._write(
            {
                "tokens": tokens,
                "data": data,
                "collapse_key": collapse_key,
                "ttl_s": ttl_s,
                "notice": {"title": notice.title, "body": notice.body, "level": notice.level},
            }
        )
        return [PushResult(t, True) for t in tokens]


class OutboxSms(_Outbox):
    VARIABLES = "RT_TWILIO_ACCOUNT_SID, RT_TWILIO_AUTH_TOKEN and RT_TWILIO_FROM"

    def __init__(self, path: Path) -> None:
        super().__init__(path, "sms")

    async def send(self, to: str, body: str, status_callback: str | None) -> str:
        await self._write({"to": to, "body": body})
        return f"outbox-{self.count}"
