"""Prometheus metrics for GET /metrics: requests, queue, batch, tokens, latencies, KV cache. One registry per app."""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize", "/v1/models",
             "/health", "/ready", "/version", "/metrics")
LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
TOKEN_GAP = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
# vLLM's bucket boundaries, so that dashboards and recording rules written for it read ours unchanged
VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0)
VLLM_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0)


class EngineCollector:
    """The engine's counts, read at each scrape, under our names and vLLM's: prompt tokens looked up in the prefix
    cache and found there, and the bytes its pool holds (nothing when it has none); draft tokens proposed by
    prompt lookup and kept."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def _counters(self, counts):
        for prefix, labels in (("polyglot_", None), ("vllm:", ["model_name"])):
            for name, doc, value in counts:
                family = CounterMetricFamily(prefix + name, doc, labels=labels)
                family.add_metric([self.model_name] if labels else [], value)
                yield family

    def collect(self):
        if getattr(self.engine, "drafted", None) is not None:
            yield from self._counters([
                ("spec_decode_num_draft_tokens", "draft tokens proposed by prompt lookup", self.engine.drafted),
                ("spec_decode_num_accepted_tokens", "draft tokens the model agreed with", self.engine.accepted)])
        stats = self.engine.prefix_cache_stats()
        if stats is None:
            return
        queries, hits, nbytes = stats
        yield from self._counters([("prefix_cache_queries", "prompt tokens looked up in the prefix cache", queries),
                                   ("prefix_cache_hits", "prompt tokens found in the prefix cache", hits)])
        yield GaugeMetricFamily("polyglot_prefix_cache_bytes", "bytes of keys and values the prefix cache holds",
                                value=nbytes)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine, devices=(), model_name: str = "model") -> None:
        """`devices`: the GPUs the model is on; their memory is read at each scrape. Each series is also written
        under vLLM's name, with a model_name label, for the autoscalers, gateways and dashboards that read those."""
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open files
        self.requests = Counter("polyglot_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("polyglot_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("polyglot_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("polyglot_cancelled_requests", "requests whose client left before the end", registry=r)
        self.failed = Counter("polyglot_failed_requests", "requests ended by an error inside the engine", registry=r)
        self.dropped = Counter("polyglot_dropped_connections", "connections dropped by a limit (header, body or "
                               "write timeout, too many connections)", ["reason"], registry=r)
        self.ttft = Histogram("polyglot_time_to_first_token_seconds", "time to first token", buckets=LATENCY,
                              registry=r)
        self.itl = Histogram("polyglot_inter_token_latency_seconds", "time between a choice's tokens",
                             buckets=TOKEN_GAP, registry=r)
        self.latency = Histogram("polyglot_request_latency_seconds", "end-to-end latency of generation requests",
                                 buckets=LATENCY, registry=r)
        self.engine = engine
        self.usage = (0, 0, 0)  # the engine's cache usage, read once per scrape
        gauges = {
            "polyglot_running_requests": ("requests in the running batch or being prefilled", lambda: engine.num_running),
            "polyglot_waiting_requests": ("requests waiting for a place in the batch", lambda: engine.num_waiting),
            "polyglot_batch_rows": ("rows in the running batch (a choice or a beam each)", lambda: self.usage[0]),
            "polyglot_kv_cache_tokens": ("tokens the running batch's KV cache spans (rows x width)",
                                         lambda: self.usage[1]),
            "polyglot_kv_cache_bytes": ("bytes of KV-cache buffers allocated", lambda: self.usage[2]),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)
        label = {"model_name": model_name}
        vllm_gauges = {
            "vllm:num_requests_running": ("requests in the running batch", lambda: engine.num_running),
            "vllm:num_requests_waiting": ("requests waiting for a place in the batch", lambda: engine.num_waiting),
            "vllm:kv_cache_usage_perc": ("share of the KV-cache token budget in use, 0 to 1 (1 = full)",
                                         lambda: min(self.usage[1] / engine.config.max_batch_tokens, 1.0)),
        }
        for name, (doc, read) in vllm_gauges.items():
            Gauge(name, doc, ["model_name"], registry=r).labels(**label).set_function(read)
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "prompt tokens processed", ["model_name"],
                                          registry=r).labels(**label)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "tokens generated", ["model_name"],
                                              registry=r).labels(**label)
        self.vllm_success = Counter("vllm:request_success", "finished choices by why they ended",
                                    ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "time to first token", ["model_name"],
                                   buckets=VLLM_TTFT, registry=r).labels(**label)
        self.vllm_itl = Histogram("vllm:inter_token_latency_seconds", "time between a choice's tokens",
                                  ["model_name"], buckets=VLLM_ITL, registry=r).labels(**label)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "end-to-end latency of generation requests",
                                  ["model_name"], buckets=VLLM_E2E, registry=r).labels(**label)
        r.register(EngineCollector(engine, model_name))
        self.devices = list(devices)
        if self.devices:
            self.device_gauges = [
                Gauge("polyglot_device_memory_reserved_bytes", "device memory held by this process's allocator "
                      "(weights, KV cache, activations, cached free blocks)", ["device"], registry=r),
                Gauge("polyglot_device_memory_used_bytes", "device memory in live tensors", ["device"], registry=r),
                Gauge("polyglot_device_memory_total_bytes", "the device's memory", ["device"], registry=r),
            ]

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.vllm_ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.vllm_itl.observe(seconds)

    def generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)
        self.vllm_generation_tokens.inc(tokens)

    def choice_done(self, finish_reason: str) -> None:
        """One choice ended: stop, length or abort (the engine's reason, as vLLM counts it)."""
        self.vllm_success.labels(self.model_name, finish_reason).inc()

    def request_done(self, path: str, status: int, seconds: float, usage: dict) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        if usage:
            self.latency.observe(seconds)
            self.vllm_e2e.observe(seconds)
            self.prompt_tokens.inc(usage["prompt_tokens"])
            self.vllm_prompt_tokens.inc(usage["prompt_tokens"])

    def dropped_connection(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def render(self) -> bytes:
        self.usage = self.engine.cache_usage()
        if self.devices:
            from ..engine.memory import device_memory  # torch: only where the model is on a GPU

            for name, *values in device_memory(self.devices):
                for gauge, value in zip(self.device_gauges, values, strict=True):
                    gauge.labels(name).set(value)
        return generate_latest(self.registry)
