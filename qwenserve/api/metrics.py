"""Prometheus metrics: request counts by status, token counters, latency histograms, and
engine gauges (running / waiting requests, KV cache) read from the engine at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineCollector(Collector):
    """Gauges sampled from `engine.stats()` on each scrape (no background polling)."""

    def __init__(self, stats: Callable[[], Any | None]):
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        if stats is None:
            return
        gauges = [
            ("qwenserve_num_requests_running", "Requests currently being generated.", stats.num_running),
            ("qwenserve_num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            (
                "qwenserve_kv_cache_usage_perc",
                "Fraction of KV cache blocks in use (0..1).",
                stats.kv_cache_usage,
            ),
            ("qwenserve_kv_cache_blocks", "KV cache blocks in the pool.", stats.num_kv_blocks),
            (
                "qwenserve_kv_cache_free_blocks",
                "KV cache blocks free (cached blocks count as free).",
                stats.num_free_blocks,
            ),
            (
                "qwenserve_kv_cache_cached_blocks",
                "Prefix-cache blocks kept for reuse.",
                stats.num_cached_blocks,
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))


class Metrics:
    """All series on one private registry, so several apps can live in one process (tests)."""

    def __init__(self, stats: Callable[[], Any | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qwenserve_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "qwenserve_prompt_tokens", "Prompt tokens of requests admitted to the engine (aborted ones too).", registry=r
        )
        self.cached_tokens = Counter(
            "qwenserve_cached_prompt_tokens", "Prompt tokens served from the prefix cache.", registry=r
        )
        self.generation_tokens = Counter("qwenserve_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter(
            "qwenserve_request_finished",
            "Finished generations by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "qwenserve_time_to_first_token_seconds",
            "Time to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "qwenserve_inter_token_latency_seconds",
            "Time between output tokens.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "qwenserve_e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        """The exposition text for GET /metrics."""
        return generate_latest(self.registry)
