"""The server's Prometheus metrics (prometheus-client), in a registry of their own so that
two servers in one process (tests) do not share counts."""

from __future__ import annotations

# Seconds: from a few milliseconds (a tiny model's step) to a minute (a long queue).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class ServerMetrics:
    """Counters, gauges and histograms of one server; :meth:`render` is ``GET /metrics``.

    - ``adaption_fx_requests_total{adapter, status}``: HTTP requests by the model they named
      and their HTTP status (streams count when they end: ``200``, ``error``,
      ``cancelled``);
    - ``adaption_fx_prompt_tokens_total`` / ``adaption_fx_generation_tokens_total``
      ``{adapter}``;
    - ``adaption_fx_queue_depth`` / ``adaption_fx_running_batch_size``: waiting requests,
      rows in the decode batch;
    - ``adaption_fx_time_to_first_token_seconds`` and
      ``adaption_fx_inter_token_latency_seconds``: histograms.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "adaption_fx_requests", "Requests by model and status", ["adapter", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "adaption_fx_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "adaption_fx_generation_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.queue_depth = Gauge("adaption_fx_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge("adaption_fx_running_batch_size", "Rows decoding", registry=r)
        self.time_to_first_token = Histogram(
            "adaption_fx_time_to_first_token_seconds",
            "From arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "adaption_fx_inter_token_latency_seconds",
            "Between two tokens of one choice",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def finished(self, adapter: str, status: str, prompt_tokens: int) -> None:
        """A generation ended ("ok", "error" or "cancelled")."""
        if status == "ok":
            self.prompt_tokens.labels(adapter=adapter).inc(prompt_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
