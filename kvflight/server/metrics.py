"""Prometheus metrics of the API process (kvflight:* names): request latencies observed here, engine gauges and
counters copied from the core's stats snapshots."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvflight.server.engine_core import EngineStats

LATENCY_BUCKETS_S: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                                        2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_LATENCY_BUCKETS_S: tuple[float, ...] = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                                              0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    """One registry per server (tests may build several apps in one process)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ("model_name",)
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        self.ttft = hist("kvflight:time_to_first_token_seconds", "Time to first token (arrival to first token)",
                         LATENCY_BUCKETS_S)
        self.time_per_output_token = hist("kvflight:time_per_output_token_seconds",
                                          "Per request: (e2e - ttft) / (output tokens - 1)", TOKEN_LATENCY_BUCKETS_S)
        self.inter_token_latency = hist("kvflight:inter_token_latency_seconds",
                                        "Time between consecutive output tokens", TOKEN_LATENCY_BUCKETS_S)
        self.e2e_latency = hist("kvflight:e2e_request_latency_seconds", "Arrival to last token", LATENCY_BUCKETS_S)
        self.queue_time = hist("kvflight:request_queue_time_seconds", "Arrival to first scheduled in the engine",
                               LATENCY_BUCKETS_S)
        self.num_running = gauge("kvflight:num_requests_running", "Requests in the running batch")
        self.num_waiting = gauge("kvflight:num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("kvflight:kv_cache_usage_perc", "Fraction of KV blocks held by requests (0-1)")
        self.prefix_hit_rate = gauge("kvflight:prefix_cache_hit_rate", "Reused / looked-up prompt blocks (0-1)")
        self.prefix_queries = counter("kvflight:prefix_cache_queries", "Prompt blocks looked up in the prefix cache")
        self.prefix_hits = counter("kvflight:prefix_cache_hits", "Prompt blocks found in the prefix cache "
                                   "(GPU or host tier)")
        self.prefix_host_hits = counter("kvflight:prefix_cache_host_hits", "Prompt blocks found in the host tier "
                                        "and copied back to the GPU instead of recomputed")
        self.prefix_host_hit_rate = gauge("kvflight:prefix_cache_host_hit_rate",
                                          "Host-tier hits / looked-up prompt blocks (0-1)")
        self.kv_offloads = counter("kvflight:kv_cache_offloaded_blocks", "KV blocks copied from the GPU to the "
                                   "host tier when evicted")
        self.host_kv_usage = gauge("kvflight:host_kv_cache_usage_perc", "Fraction of host-tier KV blocks holding "
                                   "an evicted block (0-1)")
        self.preemptions = counter("kvflight:num_preemptions", "Requests preempted (KV freed, recomputed later)")
        self.prompt_tokens = counter("kvflight:prompt_tokens", "Prompt tokens of requests that produced a token")
        self.generation_tokens = counter("kvflight:generation_tokens", "Generated tokens")
        self.requests_rejected = counter("kvflight:requests_rejected", "Requests refused with 503 (queue full, "
                                         "shutting down)")
        self._last = EngineStats()

    def update_engine_stats(self, s: EngineStats) -> None:
        self.num_running.set(s.num_running)
        self.num_waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_usage)
        looked_up = s.prefix_reused_blocks + s.prefix_missed_blocks
        self.prefix_hit_rate.set(s.prefix_reused_blocks / looked_up if looked_up else 0.0)
        self.prefix_host_hit_rate.set(s.prefix_host_hit_blocks / looked_up if looked_up else 0.0)
        self.host_kv_usage.set(s.num_host_cached_blocks / s.num_host_blocks if s.num_host_blocks else 0.0)
        last = self._last
        queries = looked_up - (last.prefix_reused_blocks + last.prefix_missed_blocks)
        if queries > 0:
            self.prefix_queries.inc(queries)
        if s.prefix_reused_blocks > last.prefix_reused_blocks:
            self.prefix_hits.inc(s.prefix_reused_blocks - last.prefix_reused_blocks)
        if s.prefix_host_hit_blocks > last.prefix_host_hit_blocks:
            self.prefix_host_hits.inc(s.prefix_host_hit_blocks - last.prefix_host_hit_blocks)
        if s.kv_offloaded_blocks > last.kv_offloaded_blocks:
            self.kv_offloads.inc(s.kv_offloaded_blocks - last.kv_offloaded_blocks)
        if s.num_preemptions_total > last.num_preemptions_total:
            self.preemptions.inc(s.num_preemptions_total - last.num_preemptions_total)
        self._last = s

    def render(self) -> bytes:
        return generate_latest(self.registry)
