"""Prometheus metrics, prefix ``atop_``, in a registry of their own per app (tests build many apps).

Labels are bounded: ``route`` is the route template (or "other"), ``status`` the HTTP status,
``result`` one of the reload outcomes, ``model`` the one configured model name.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
RELOAD_RESULTS = ("loaded", "swapped", "unchanged", "refused")  # loaded: the first version served
CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series: they double the output and nobody reads them


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.requests = Counter(
            "atop_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "atop_request_duration_seconds",
            "total time per HTTP request",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "atop_queue_wait_seconds",
            "time a classify job waited before its first batch started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "atop_inference_seconds", "model time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "atop_batch_size", "rows (image x EOT sample) per batch", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "atop_batch_requests", "requests merged into one batch", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_errors = Counter("atop_batch_errors", "batches whose inference failed", registry=r)
        self.queue_depth = Gauge("atop_queue_depth", "rows waiting for a batch", registry=r)
        self.active_version = Gauge(
            "atop_active_model_version", "version number being served (0 = none)", ["model"], registry=r
        )
        self.ready = Gauge("atop_ready", "1 when a model is loaded and warm", registry=r)
        self.reloads = Counter("atop_model_reloads", "reload attempts by result", ["result"], registry=r)
        self.images = Counter("atop_images_classified", "images answered by /classify", registry=r)
        self.suspicions = Counter(
            "atop_attack_suspicions",
            "images whose undefended and defended predictions disagree",
            registry=r,
        )
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        self.active_version.labels(model_name).set(0)

    def observe_batch(self, *, rows: int, requests: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_requests.observe(requests)
        self.inference_seconds.observe(seconds)

    def set_active(self, version: int | None) -> None:
        self.active_version.labels(self.model_name).set(version or 0)
        self.ready.set(1 if version else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
