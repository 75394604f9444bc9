"""Local fake Google token, FCM and Twilio HTTP servers that record requests (with their
arrival time), for the alert tests and the alert latency benchmark.

The server processes reach them through the real SDKs: firebase-admin (its service-account
`token_uri` points here, and RT_FCM_ENDPOINT), twilio (RT_TWILIO_BASE_URL). Behaviour is
scripted per test: failures, unregistered tokens, delays.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

TWILIO_SID = "AC" + "0" * 32
TWILIO_TOKEN = "fake-twilio-auth-token"
TWILIO_FROM = "+15005550006"


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)


@dataclass
class Script:
    twilio_fail: list[int] = field(default_factory=list)  # statuses for the next SMS requests
    twilio_permanent: set[str] = field(default_factory=set)  # numbers refused with 400
    twilio_delay_s: float = 0.0
    fcm_unregistered: set[str] = field(default_factory=set)
    fcm_fail: list[int] = field(default_factory=list)
    retry_after: str | None = None  # a Retry-After header on every scripted 429/5xx
    # While set, SMS requests are read and never answered (a hanging provider).
    twilio_hang: threading.Event = field(default_factory=threading.Event)


class FakeProviders:
    def __init__(self) -> None:
        self.script = Script()
        self.token_requests: list[Recorded] = []
        self.fcm: list[Recorded] = []
        self.accepted_push: list[str] = []  # the tokens of the requests answered 200
        self.sms: list[Recorded] = []  # every SMS request, failed ones included
        self.accepted_sms: list[str] = []  # the numbers of the requests answered 201 (sent)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._count = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                if (status == 429 or status >= 500) and fake.script.retry_after is not None:
                    self.send_header("Retry-After", fake.script.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if self.path.startswith("/token"):
                    fake.token_requests.append(Recorded(self.path, headers, raw.decode()))
                    self._reply(
                        200,
                        {
                            "access_token": "fake-google-token",
                            "expires_in": 3600,
                            "token_type": "Bearer",
                        },
                    )
                elif re.fullmatch(r"/v1/projects/[^/]+/messages:send", self.path):
                    fake._fcm(self, headers, json.loads(raw))
                elif re.fullmatch(r"/2010-04-01/Accounts/[^/]+/Messages\.json", self.path):
                    fake._twilio(self, headers, dict(urllib.parse.parse_qsl(raw.decode())))
                else:
                    self._reply(404, {"error": "unknown path"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _next_id(self) -> int:
        with self._lock:
            self._count += 1
            return self._count

    def _fcm(self, h: Any, headers: dict[str, str], body: dict[str, Any]) -> None:
        self.fcm.append(Recorded(h.path, headers, body))
        token = body["message"]["token"]
        if self.script.fcm_fail:
            status = self.script.fcm_fail.pop(0)
            h._reply(status, {"error": {"code": status, "message": "boom", "status": "INTERNAL"}})
        elif token in self.script.fcm_unregistered:
            h._reply(
                404,
                {
                    "error": {
                        "code": 404,
                        "message": "Requested entity was not found.",
                        "status": "NOT_FOUND",
                        "details": [
                            {
                                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                "errorCode": "UNREGISTERED",
                            }
                        ],
                    }
                },
            )
        else:
            self.accepted_push.append(token)
            h._reply(200, {"name": f"projects/rt-test/messages/{self._next_id()}"})

    def _twilio(self, h: Any, headers: dict[str, str], form: dict[str, str]) -> None:
        self.sms.append(Recorded(h.path, headers, form))
        while self.script.twilio_hang.is_set() and not self._closing.is_set():
            self._closing.wait(0.05)  # hold the request unanswered
        if self.script.twilio_delay_s:
            time.sleep(self.script.twilio_delay_s)
        if form.get("To") in self.script.twilio_permanent:
            h._reply(
                400, {"code": 21211, "message": "The 'To' number is not valid.", "status": 400}
            )
            return
        if self.script.twilio_fail:
            status = self.script.twilio_fail.pop(0)
            h._reply(status, {"code": 20500, "message": "Internal Server Error", "status": status})
            return
        sid = f"SM{self._next_id():032d}"
        self.accepted_sms.append(form.get("To", ""))
        h._reply(
            201,
            {
                "sid": sid,
                "status": "queued",
                "to": form.get("To"),
                "from": form.get("From"),
                "body": form.get("Body"),
                "account_sid": TWILIO_SID,
            },
        )

    def sms_to(self, number: str) -> list[dict[str, str]]:
        return [r.body for r in self.sms if r.body.get("To") == number]

    def fcm_to(self, token: str) -> list[dict[str, Any]]:
        return [r.body["message"] for r in self.fcm if r.body["message"]["token"] == token]

    def service_account(self, directory: Path) -> Path:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        path = directory / "service-account.json"
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "rt-test",
                    "private_key_id": "k1",
                    "private_key": pem,
                    "client_email": "rt@rt-test.iam.gserviceaccount.com",
                    "client_id": "1",
                    "token_uri": f"{self.url}/token",
                }
            )
        )
        return path

    def env(self, directory: Path) -> dict[str, str]:
        return {
            "RT_FCM_CREDENTIALS": str(self.service_account(directory)),
            "RT_FCM_ENDPOINT": self.url,
            "RT_TWILIO_ACCOUNT_SID": TWILIO_SID,
            "RT_TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "RT_TWILIO_FROM": TWILIO_FROM,
            "RT_TWILIO_BASE_URL": self.url,
        }

    def __enter__(self) -> FakeProviders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
