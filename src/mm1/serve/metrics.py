"""`GET /metrics`: the server's counters and latencies in the Prometheus text format.

Operators scrape these (vLLM's names are similar): requests by outcome, prompt and generated tokens,
the queue and the running rows, and histograms of the time to first token and of a request's whole
latency. Each server has its own registry, so that several servers in one process (tests) do not mix.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """What `/metrics` reports; `waiting` and `running` are read when scraped."""

    def __init__(self, *, waiting: Callable[[], int], running: Callable[[], int], model: str,
                 image_cache=None) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model": model}
        self.requests = Counter("mm1_requests", "requests answered, by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("mm1_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("mm1_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("mm1_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("mm1_request_latency_seconds", "from arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        Gauge("mm1_requests_waiting", "requests queued for a row", registry=r).set_function(waiting)
        Gauge("mm1_requests_running", "requests decoding", registry=r).set_function(running)
        if image_cache is not None:  # counts that only grow, read when scraped
            Gauge("mm1_image_cache_hits", "images whose embedding came from the cache", registry=r).set_function(
                lambda: image_cache.hits)
            Gauge("mm1_image_cache_misses", "images the encoder ran on", registry=r).set_function(
                lambda: image_cache.misses)
            Gauge("mm1_image_cache_bytes", "memory the cached embeddings take", registry=r).set_function(
                lambda: image_cache.bytes)
        Gauge("mm1_model_info", "the model served", list(labels), registry=r).labels(**labels).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
