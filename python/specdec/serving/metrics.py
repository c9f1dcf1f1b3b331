"""Prometheus metrics (served on their own HTTP port) and structured JSON log lines.

Every series lives in the server's own ``CollectorRegistry``, so several servers can share a process (tests).
Names are snake_case with unit suffixes; counters get ``_total`` from prometheus_client.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from specdec.types import Completion

# Latency buckets from 5 ms to 2 min: CPU decoding of a 1.5B model is seconds per request.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# The series, named once (the README lists them from here).
METRIC_NAMES = {
    "specdec_time_to_first_token_seconds": "histogram: arrival to first generated token",
    "specdec_inter_token_latency_seconds": "histogram: per token, the gap between consecutive steps / tokens in the step",
    "specdec_e2e_request_latency_seconds": "histogram: arrival to the end of the request",
    "specdec_queue_time_seconds": "histogram: arrival to the first engine step",
    "specdec_draft_tokens_proposed_total": "counter: draft tokens proposed",
    "specdec_draft_tokens_accepted_total": "counter: draft tokens accepted",
    "specdec_generated_tokens_total": "counter: tokens emitted",
    "specdec_prompt_tokens_total": "counter: prompt tokens of finished requests",
    "specdec_verify_steps_total": "counter: target verify steps of finished requests",
    "specdec_requests_total": "counter by finish_reason (length, eos, stop_sequence, stop_token, cancelled, deadline)",
    "specdec_requests_failed_total": "counter by kind (invalid_argument, resource_exhausted, unavailable, unauthenticated, internal)",
    "specdec_requests_running": "gauge: requests being stepped",
    "specdec_requests_waiting": "gauge: requests in the admission queue",
    "specdec_requests_unread": "gauge: streams out of the batch until their client reads",
    "specdec_sequences_holding_cache": "gauge: started sequences still holding a KV cache (0 when idle)",
    "specdec_prefix_cache_queried_tokens_total": "counter: prompt tokens looked up in the prefix cache",
    "specdec_prefix_cache_hit_tokens_total": "counter: prompt tokens whose keys and values the prefix cache held",
    "specdec_prefix_cache_bytes": "gauge: bytes the prefix cache holds (the target's and the draft's blocks)",
}


class Metrics:
    """The server's series; also the scheduler's observer (called on its worker thread)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("specdec_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("specdec_inter_token_latency_seconds",
                             "Per token: gap between consecutive engine steps of a request / tokens in the step.",
                             buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("specdec_e2e_request_latency_seconds", "Arrival to end of request.",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue = Histogram("specdec_queue_time_seconds", "Arrival to the request's first engine step.",
                               buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.proposed = Counter("specdec_draft_tokens_proposed", "Draft tokens proposed.", registry=r)
        self.accepted = Counter("specdec_draft_tokens_accepted", "Draft tokens accepted.", registry=r)
        self.generated = Counter("specdec_generated_tokens", "Tokens emitted.", registry=r)
        self.prompt = Counter("specdec_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.verify_steps = Counter("specdec_verify_steps", "Target verify steps of finished requests.", registry=r)
        self.requests = Counter("specdec_requests", "Finished requests by finish reason.", ["finish_reason"], registry=r)
        self.failed_requests = Counter("specdec_requests_failed", "Requests that ended with an error status, by kind.",
                                       ["kind"], registry=r)  # fmt: skip
        self.running = Gauge("specdec_requests_running", "Requests being stepped by the engine.", registry=r)
        self.waiting = Gauge("specdec_requests_waiting", "Requests in the admission queue.", registry=r)
        self.unread = Gauge("specdec_requests_unread", "Streams out of the batch until their client reads.", registry=r)
        self.holding_cache = Gauge("specdec_sequences_holding_cache",
                                   "Started sequences still holding a KV cache (0 when idle; more is a leak).",
                                   registry=r)  # fmt: skip
        self._prefix_cache: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        r.register(_PrefixCacheCollector(lambda: self._prefix_cache()))
        self._http = None

    def bind_counts(self, running: Callable[[], float], waiting: Callable[[], float],
                    holding_cache: Callable[[], float] = lambda: 0, unread: Callable[[], float] = lambda: 0,
                    prefix_cache: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)) -> None:  # fmt: skip
        """Read the live counts at scrape time; ``prefix_cache`` gives (queried tokens, hit tokens, bytes held)."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.holding_cache.set_function(holding_cache)
        self.unread.set_function(unread)
        self._prefix_cache = prefix_cache

    # ---- scheduler observer -----------------------------------------------------------------

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def tokens(self, n: int, seconds_per_token: float | None) -> None:
        self.generated.inc(n)
        if seconds_per_token is not None:
            for _ in range(n):
                self.itl.observe(seconds_per_token)

    def finished(self, c: Completion) -> None:
        self.requests.labels(finish_reason=c.finish_reason.value).inc()
        self.e2e.observe(c.e2e_s)
        self.queue.observe(c.queue_s)
        self.proposed.inc(c.proposed)
        self.accepted.inc(c.accepted)
        self.prompt.inc(c.prompt_tokens)
        self.verify_steps.inc(c.verify_steps)

    def failed(self, kind: str) -> None:
        self.failed_requests.labels(kind=kind).inc()

    # ---- HTTP endpoint ----------------------------------------------------------------------

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics endpoint in a thread; returns the bound port (``port`` 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _PrefixCacheCollector(Collector):
    """The engine's prefix-cache counts, read at scrape time (the engine keeps them; nothing is copied per step)."""

    def __init__(self, read: Callable[[], tuple[int, int, int]]) -> None:
        self.read = read

    def collect(self):
        queried, hit, held = self.read()
        yield CounterMetricFamily("specdec_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
                                  value=queried)  # fmt: skip
        yield CounterMetricFamily("specdec_prefix_cache_hit_tokens", "Prompt tokens the prefix cache held.", value=hit)
        yield GaugeMetricFamily("specdec_prefix_cache_bytes", "Bytes the prefix cache holds.", value=held)


# ---- structured logging -------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's ``extra={"fields": {...}}``, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(level: str = "info", fmt: str = "json", stream=None) -> None:
    """Configure the ``specdec`` loggers (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("specdec")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
