"""`/metrics`: what the server has done and is doing, in Prometheus' text format (prometheus_client).

Each app has its own registry (two servers in one process, as in tests, do not share counts). Names
follow vLLM's where there is one (`time_to_first_token_seconds`, `time_per_output_token_seconds`,
`prompt_tokens_total`...), with a `gptcli_` prefix.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The endpoints counted by name; anything else is "other" (a client must not grow the label set).
ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/health",
    "/metrics",
)

_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


def _reader(stats: Callable[[], dict[str, int]], key: str) -> Callable[[], float]:
    return lambda: float(stats()[key])


class Metrics:
    """The server's counters, gauges and histograms; `stats()` gives the engine's gauges when scraped."""

    def __init__(self, stats: Callable[[], dict[str, int]], kv_budget: int) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "gptcli_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "gptcli_prompt_tokens", "Prompt tokens of the requests served", registry=registry
        )
        self.generation_tokens = Counter(
            "gptcli_generation_tokens", "Tokens generated and sent", registry=registry
        )
        self.ttft = Histogram(
            "gptcli_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=_TTFT,
            registry=registry,
        )
        self.per_token = Histogram(
            "gptcli_time_per_output_token_seconds",
            "Between two tokens of one completion",
            buckets=_PER_TOKEN,
            registry=registry,
        )
        gauges = {
            "gptcli_running_rows": ("Completions decoding now (rows of the batch)", "rows"),
            "gptcli_paused_rows": ("Completions paused because their client reads slower", "paused"),
            "gptcli_waiting_requests": ("Requests waiting for room in the batch (queue depth)", "waiting"),
            "gptcli_kv_cache_bytes": ("Bytes of the running batch's KV cache", "kv_bytes"),
        }
        for name, (help_text, key) in gauges.items():
            Gauge(name, help_text, registry=registry).set_function(_reader(stats, key))
        Gauge(
            "gptcli_kv_cache_usage_ratio", "The batch's KV cache over its budget (0 to 1)", registry=registry
        ).set_function(lambda: stats()["kv_bytes"] / kv_budget)

    def request(self, path: str, status: str) -> None:
        endpoint = "/v1/models" if path.startswith("/v1/models/") else path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, status).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
