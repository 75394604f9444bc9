"""The node's Prometheus metrics: one registry per node (several nodes can live in one
process), rendered at `/metrics` in the text exposition format, HELP and TYPE on everything.

The per-frame counters are plain integers on the hot path (`frames_in += 1` costs nothing) and
are read by a collector at scrape time, as are the gauges; latencies are histograms. The
channel layer and the alert service register their own metrics in the same registry
(`channels.metrics`, `alerts.metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Gauges:
    """Read at scrape time."""

    connections: Callable[[], int]
    channels: Callable[[], int]
    queued_frames: Callable[[], int]
    published: Callable[[], int]  # a counter, read at scrape time like the gauges
    shed_fraction: Callable[[], float]
    loop_lag_s: Callable[[], float]
    shed: Callable[[], int]  # a counter


@dataclass
class NodeMetrics:
    frames_in: int = 0
    frames_out: int = 0
    slow_consumers: int = 0
    flood_closes: int = 0
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        ProcessCollector(registry=self.registry)

    def watch(self, gauges: Gauges) -> None:
        self.registry.register(_Collector(self, gauges))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: NodeMetrics, gauges: Gauges) -> None:
        self._m = metrics
        self._g = gauges

    def collect(self) -> Iterator[Metric]:
        m, g = self._m, self._g
        for name, doc, value in (
            ("rt_frames_in", "Frames received from clients", m.frames_in),
            ("rt_frames_out", "Frames sent to clients", m.frames_out),
            (
                "rt_messages_published",
                "Messages stored and fanned out (not duplicates)",
                g.published(),
            ),
            (
                "rt_slow_consumer_closes",
                "Connections closed 4008 for not reading",
                m.slow_consumers,
            ),
            ("rt_flood_closes", "Connections closed 4008 for flooding", m.flood_closes),
            ("rt_shed_commands", "Commands refused because the node was overloaded", g.shed()),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, read in (
            ("rt_connections", "Open WebSocket connections on this node", g.connections),
            ("rt_node_channels", "Channels this node receives from the broker", g.channels),
            ("rt_outgoing_queued_frames", "Frames waiting behind full sockets", g.queued_frames),
            ("rt_shed_fraction", "Share of chat commands refused now (overload)", g.shed_fraction),
            ("rt_event_loop_lag_seconds", "How late the last event-loop timer fired", g.loop_lag_s),
        ):
            yield GaugeMetricFamily(name, doc, value=read())
