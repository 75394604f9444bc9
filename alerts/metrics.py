"""What the alert service measures (Prometheus): triggers, how long until the first provider
request, provider calls, and every delivery outcome by route."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.triggers = Counter(
            "rt_alert_triggers",
            "alert.trigger answers: created, retried (the same client_alert_id) or refused",
            ["result"],
            registry=registry,
        )
        self.trigger_to_provider_seconds = Histogram(
            "rt_alert_trigger_to_provider_seconds",
            "From an alert's creation to the first request for it on a route",
            ["route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.provider_seconds = Histogram(
            "rt_alert_provider_call_seconds",
            "One provider call (WebSocket publish, FCM send, Twilio message), by route",
            ["route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.deliveries = Counter(
            "rt_alert_deliveries",
            "Delivery attempts by route and outcome (sent, delivered, retry, failed, cancelled,"
            " skipped)",
            ["route", "outcome"],
            registry=registry,
        )
