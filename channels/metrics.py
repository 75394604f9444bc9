"""What the channel layer measures (Prometheus): backend calls made for client commands, broker
publishes, and the fan-out of each message on this node. One instance per node, registered in
the node's registry (`realtime.metrics`), so several nodes in one process never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

# Seconds: sub-millisecond in-memory paths up to the store timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ChannelMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.published = 0  # messages stored and fanned out, duplicates not counted (a counter)
        self.publish_seconds = Histogram(
            "rt_publish_seconds",
            "A publish command from its frame to its acknowledgement (store and fan-out)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.backend_seconds = Histogram(
            "rt_backend_call_seconds",
            "A store or broker call made for a client command, by command (timeouts included)",
            ["call"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.broker_publish_seconds = Histogram(
            "rt_broker_publish_seconds",
            "One message published to the broker (Redis PUBLISH, or in-process)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fanout_seconds = Histogram(
            "rt_fanout_seconds",
            "One message handed to every local subscriber of its channel on this node",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.delivery_lag_seconds = Histogram(
            "rt_delivery_lag_seconds",
            "From a message's store timestamp to its fan-out on this node (any node's publish)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
