"""Prometheus metrics of one server (its own registry, so servers and tests do not share state).

Counters are updated by the request handlers; the gauges are copied from the engine loop's
snapshot when /metrics is scraped, so scraping never touches the engine itself.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# gauge name -> (help, key in EngineLoop.snapshot())
_GAUGES = {
    "sagequant_queue_depth": ("requests waiting for a batch slot (engine queue + not yet admitted)", None),
    "sagequant_requests_running": ("requests in the running batch", "running"),
    "sagequant_requests_in_flight": ("requests the server holds (running + queued)", "pending"),
    "sagequant_kv_blocks_used": ("KV-cache blocks in use", "kv_blocks_used"),
    "sagequant_kv_blocks_total": ("KV-cache blocks in the pool", "kv_blocks_total"),
    "sagequant_kv_bytes_per_token": ("KV-cache bytes per token (all layers)", "kv_bytes_per_token"),
    "sagequant_generation_tokens_per_second": ("generated tokens per second over the last 10 s",
                                               "tokens_per_second"),
    "sagequant_engine_step_errors": ("engine steps that raised (their requests failed with 500)",
                                     "step_errors"),
}

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("sagequant_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("sagequant_prompt_tokens", "prompt tokens of accepted requests",
                                     registry=self.registry)
        self.generated_tokens = Counter("sagequant_generated_tokens", "tokens generated",
                                        registry=self.registry)
        self.latency = Histogram("sagequant_request_latency_seconds",
                                 "time from request to last token of successful generations",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.gauges = {name: Gauge(name, help_, registry=self.registry)
                       for name, (help_, _) in _GAUGES.items()}

    def render(self, snapshot: dict) -> bytes:
        for name, (_, key) in _GAUGES.items():
            if key is None:  # queue depth: the engine's waiting list plus the server's inbox
                value = snapshot.get("waiting", 0) + snapshot.get("inbox", 0)
            else:
                value = snapshot.get(key, 0)
            self.gauges[name].set(float(value))
        return generate_latest(self.registry)
