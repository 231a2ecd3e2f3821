"""Prometheus metrics of the service, in a registry of its own (several services can run in one process).

deploy/grafana/dashboards/edge-agent.json charts these names; tests check that every metric the
dashboard queries exists here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class ServiceMetrics:
    """All metrics of one service instance."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.frames_received = Counter("agent_frames_received", "Frame messages received.", ["cell"], registry=r)
        self.frames_rejected = Counter("agent_frames_rejected", "Frame messages rejected, by error code.", ["cell", "code"], registry=r)
        self.messages_ignored = Counter(
            "agent_messages_ignored", "Inbound messages ignored as redelivered duplicates or late (part already finalised).", ["cell", "kind", "reason"], registry=r
        )
        self.errors = Counter("agent_errors", "Error messages published, by code.", ["cell", "code"], registry=r)
        self.views_processed = Counter("agent_views_processed", "Views run through the inspection, by outcome (ok, failed).", ["cell", "outcome"], registry=r)
        self.parts = Counter("agent_parts", "Parts finalised, by verdict.", ["cell", "verdict"], registry=r)
        self.view_latency = Histogram(
            "agent_view_latency_seconds", "Frame received to view processed (pairing, queueing and inspection).", ["cell"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.verdict_latency = Histogram(
            "agent_verdict_latency_seconds", "Last view processed (or part end) to verdict published.", ["cell"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.queue_depth = Gauge("agent_queue_depth", "Items waiting in the service's queues.", ["queue"], registry=r)
        self.parts_active = Gauge("agent_parts_active", "Parts being inspected.", ["cell"], registry=r)
        self.recipe_info = Gauge("agent_recipe_info", "Recipes loaded (value 1), with their content version.", ["recipe", "version"], registry=r)
        self.device_info = Gauge("agent_device_info", "Compute device the inspection runs on (value 1).", ["device"], registry=r)
        self.mqtt_connected = Gauge("agent_mqtt_connected", "1 while the cell's MQTT connection is up.", ["cell"], registry=r)
        self.mqtt_reconnects = Counter("agent_mqtt_reconnects", "MQTT connection attempts after the first one.", ["cell"], registry=r)
        self.workers = Gauge("agent_workers", "Inspection worker threads.", registry=r)
        for queue in ("inbound", "views", "pose_wait", "outbound"):
            self.queue_depth.labels(queue)

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP server in a thread; returns the server (``server.server_port``, ``shutdown()``)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def scrape(self) -> str:
        """The text exposition, as Prometheus would scrape it."""
        return generate_latest(self.registry).decode("utf-8")
