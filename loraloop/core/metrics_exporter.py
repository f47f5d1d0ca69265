"""The HTTP endpoint that Prometheus scrapes, shared by the server and the learner.

Each process keeps its collectors on a `CollectorRegistry` of its own (never the global
one), so tests can hold several processes' worth of metrics in one interpreter; this
serves one such registry on `/metrics` from a daemon thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


@dataclass
class MetricsExporter:
    """A running `/metrics` endpoint; `port` is the bound one (useful when asked for 0)."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def start_metrics_exporter(registry: CollectorRegistry, host: str, port: int) -> MetricsExporter:
    """Serve `registry` on http://host:port/metrics (port 0 picks a free one)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsExporter(server, thread, host, bound)
