"""What the alert service measures (Prometheus): triggers, how long until the first provider
request and until the recipient's app has it, provider calls, every delivery outcome by route,
route fallbacks, and how far each route's queue is behind."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
            "From when an alert is to go out (its creation, or the end of its cancel window) "
            "to the first request for it on a route",
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
            "Delivery outcomes by route (sent, outbox, offline, delivered, undelivered, retry,"
            " failed, cancelled, skipped)",
            ["route", "outcome"],
            registry=registry,
        )
        self.trigger_to_received_seconds = Histogram(
            "rt_alert_trigger_to_received_seconds",
            "From an alert's creation to the recipient's app saying it has it (alert.received),"
            " by the route it came by",
            ["route"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.fallbacks = Counter(
            "rt_alert_fallbacks",
            "Contacts whose app did not confirm a notice in time: sms (the SMS was planned) or"
            " not_needed (confirmed, acknowledged, resolved or the contact removed meanwhile)",
            ["outcome"],
            registry=registry,
        )
        self.queue_lag_seconds = Gauge(
            "rt_alert_queue_lag_seconds",
            "How long the oldest due delivery job of a route has waited to be done",
            ["route"],
            registry=registry,
        )
        self.oldest_unsent_seconds = Gauge(
            "rt_alert_oldest_unsent_seconds",
            "Age of the oldest delivery job of a route not done yet (due, or waiting to retry)",
            ["route"],
            registry=registry,
        )
        self.queue_jobs = Gauge(
            "rt_alert_queue_jobs",
            "Delivery jobs in a route's queue (due or waiting to retry; counted up to 500)",
            ["route"],
            registry=registry,
        )
        self.queue_up = Gauge(
            "rt_alert_queue_up",
            "1 while a route's queue answers (alerts can be queued), else 0",
            ["route"],
            registry=registry,
        )
