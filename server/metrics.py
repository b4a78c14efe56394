"""Prometheus metrics of the server (prometheus_client, one registry per app).

Request outcomes, token counts and latency histograms are recorded as requests run; queue depth,
batch occupancy, prompt-cache and speculative figures are read from the scheduler at scrape time.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..runtime.requests import RequestHandle, StreamResponse
from ..runtime.scheduler import Scheduler

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_TTFT_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class _SchedulerCollector:
    """Figures the scheduler keeps, read when /metrics is scraped."""

    def __init__(self, scheduler: Callable[[], Scheduler | None]):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler()
        if s is None:  # still loading
            return
        stats = s.stats
        yield GaugeMetricFamily("edgerun_queue_depth", "Requests waiting for a batch row", value=s.queue_depth)
        yield GaugeMetricFamily("edgerun_running_requests", "Requests holding a batch row (prefilling or decoding)",
                                value=s.running)
        yield GaugeMetricFamily("edgerun_batch_rows", "Rows of the KV cache (most requests decoding at once)",
                                value=s.max_batch)
        yield GaugeMetricFamily("edgerun_batch_occupancy", "Fraction of batch rows held by requests now",
                                value=s.running / s.max_batch)
        yield CounterMetricFamily("edgerun_decode_steps", "Decode passes run", value=stats.steps)
        yield CounterMetricFamily("edgerun_decode_step_rows", "Decoding rows summed over decode passes (divided by "
                                  "edgerun_decode_steps_total: mean batch occupancy)", value=stats.step_rows)
        yield CounterMetricFamily("edgerun_prefill_chunks", "Prompt chunks run", value=stats.prefill_chunks)
        if s.prompt_cache is not None:
            cache = s.prompt_cache.stats
            yield CounterMetricFamily("edgerun_prompt_cache_hits", "Requests that reused a cached prompt prefix",
                                      value=cache.hits)
            yield GaugeMetricFamily("edgerun_prompt_cache_bytes", "Host memory held by cached sequences",
                                    value=cache.stored_bytes)
        yield CounterMetricFamily("edgerun_speculative_draft_tokens", "Draft tokens proposed (speculative decoding)",
                                  value=stats.drafts_proposed)
        yield CounterMetricFamily("edgerun_speculative_accepted_tokens", "Draft tokens accepted",
                                  value=stats.drafts_accepted)
        yield GaugeMetricFamily("edgerun_speculative_acceptance_ratio", "Accepted / proposed draft tokens so far",
                                value=stats.drafts_accepted / stats.drafts_proposed if stats.drafts_proposed else 0.0)


class RequestTracker:
    """Latency figures of one request as its responses arrive."""

    def __init__(self, metrics: ServerMetrics, handle: RequestHandle):
        self.metrics, self.handle, self.last = metrics, handle, None

    def token(self, response: StreamResponse) -> None:
        if self.last is None:
            self.metrics.ttft.observe(response.time - self.handle.submitted)
        else:
            self.metrics.inter_token.observe(response.time - self.last)
        self.last = response.time

    def finished(self, endpoint: str) -> None:
        handle, m = self.handle, self.metrics
        m.requests.labels(endpoint, handle.finish_reason or "cancelled").inc()
        if handle.usage is not None:
            m.prompt_tokens.inc(handle.usage.prompt_tokens)
            m.cached_tokens.inc(handle.usage.cached_tokens)
            m.completion_tokens.inc(handle.usage.completion_tokens)
        if handle.timings is not None:
            m.duration.observe(handle.timings.total)


class ServerMetrics:
    """The app's metrics; `render()` gives the Prometheus text exposition."""

    def __init__(self, scheduler: Callable[[], Scheduler | None]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgerun_requests", "Finished requests by endpoint and finish reason",
                                ["endpoint", "finish_reason"], registry=r)
        self.errors = Counter("edgerun_request_errors", "Requests answered with an error, by HTTP status",
                              ["status"], registry=r)
        self.prompt_tokens = Counter("edgerun_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("edgerun_cached_prompt_tokens", "Prompt tokens taken from the prompt cache",
                                     registry=r)
        self.completion_tokens = Counter("edgerun_completion_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("edgerun_time_to_first_token_seconds", "Submission to first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("edgerun_inter_token_latency_seconds", "Time between a request's tokens",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("edgerun_request_duration_seconds", "Submission to last token",
                                  buckets=_DURATION_BUCKETS, registry=r)
        r.register(_SchedulerCollector(scheduler))

    def track(self, handle: RequestHandle) -> RequestTracker:
        return RequestTracker(self, handle)

    def error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
