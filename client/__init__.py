"""The Python client library (protocol v1), for apps and for the tests and benchmarks.

Offers `Client` (`client.core`): connects to any of several nodes, authenticates, reconnects
with backoff and jitter, resumes every subscription with `since_seq` (every message once, in
order), retries a publish with the same `client_msg_id` (never doubled), triggers alerts with a
stable `client_alert_id`; and its errors `ServerError` and `ConnectionLost`.

The end-to-end encrypted client built on it is `crypto.client.SecureClient`.
"""

from .core import Client, ConnectionLost, ServerError

__all__ = ["Client", "ConnectionLost", "ServerError"]
