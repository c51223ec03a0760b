"""Prometheus metrics of the server (GET /metrics), in a registry of its own.

Tokens per second is `rate(internvl_generated_tokens_total[1m])`; time to first token and the time
between tokens are histograms. Buckets cover a CPU test model (seconds) and a GPU (milliseconds).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("internvl_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.errors = Counter("internvl_request_errors", "Requests that ended in an error, by error_type", ["error_type"], registry=r)
        self.request_duration = Histogram("internvl_request_duration_seconds", "Time from request received to response finished", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("internvl_time_to_first_token_seconds", "Time from request received to its first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("internvl_inter_token_latency_seconds", "Mean time between generated tokens of a request", buckets=TOKEN_BUCKETS, registry=r)
        self.queue_time = Histogram("internvl_queue_seconds", "Time a prepared request waited for a batch row", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("internvl_prompt_tokens", "Prompt tokens processed (image tokens included)", registry=r)
        self.generated_tokens = Counter("internvl_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("internvl_queue_depth", "Requests prepared and waiting for a batch row", registry=r)
        self.running = Gauge("internvl_running_requests", "Requests in the decode batch", registry=r)
        self.in_flight = Gauge("internvl_in_flight_requests", "Requests admitted and not yet answered (limit: --max-concurrent-requests)", registry=r)
        self.prefill_duration = Histogram("internvl_prefill_seconds", "Time of one admission round: vision tower, prefill and first tokens of the requests admitted together", buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_requests = Histogram("internvl_prefill_requests", "Requests admitted together in one admission round", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.image_cache_hits = Counter("internvl_image_cache_hits", "Images whose vision features came from the cache (--image-cache-mb)", registry=r)
        self.image_cache_misses = Counter("internvl_image_cache_misses", "Images not in the cache: decoded, tiled and encoded", registry=r)
        self.image_cache_bytes = Gauge("internvl_image_cache_bytes", "GPU memory held by cached vision features", registry=r)
        self.batch_size = Histogram("internvl_batch_size", "Rows per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ready = Gauge("internvl_ready", "1 once the warm-up image+text request succeeded", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
