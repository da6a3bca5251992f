"""Prometheus metrics, one registry per App, kept cheap on the step path.

Steps are counted by each model's executor thread in bulk, once per batch, into
plain integers and bucket counts that only that thread writes; live figures
(sessions, state bytes, queue depth) are read from the core when scraped.
Session lifecycle and rejections are rare enough for ordinary counters.
"""

import bisect
import collections
import itertools
import threading
import time

import grpc
import numpy as np
import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

STARTED_REASONS = ("new", "restored", "imported")
ENDED_REASONS = ("closed", "idle_timeout", "evicted")
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_NUMPY_FROM = 16  # below this many values a Python loop is cheaper


class BulkHistogram:
    """Bucket counts filled many values at a time; one writer thread at most."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self._bounds = np.asarray(bounds, np.float64)
        # Python ints: cheaper than NumPy scalars one value at a time.
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, values) -> None:
        if len(values) < _NUMPY_FROM:
            counts, bounds = self.counts, self.bounds
            for value in values:
                counts[bisect.bisect_left(bounds, value)] += 1
                self.sum += value
            return
        values = np.asarray(values, np.float64)
        buckets = np.searchsorted(self._bounds, values, side="left")
        added = np.bincount(buckets, minlength=len(self.counts)).tolist()
        self.counts = [a + b for a, b in zip(self.counts, added)]
        self.sum += float(values.sum())

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (upper bound, count) pairs, as Prometheus expects."""
        labels = [_bound(b) for b in self.bounds] + ["+Inf"]
        return list(zip(labels, itertools.accumulate(self.counts)))


class ModelStats:
    """What one model's executors served. Every version of a model has its own
    executor thread and all of them write here, hence the lock (one uncontended
    acquire per batch)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.steps = 0
        self.timesteps = 0
        self.step_latency_s = BulkHistogram(LATENCY_BUCKETS_S)
        self.batch_size = BulkHistogram(BATCH_BUCKETS)

    def record_steps(self, ops) -> None:
        """One executed batch of StepOps: counts, latencies and each session's
        time of last step."""
        now, used_s = time.perf_counter(), time.monotonic()
        with self._lock:
            self.steps += len(ops)
            self.timesteps += sum(len(op.inputs) for op in ops)
            self.batch_size.observe((len(ops),))
            self.step_latency_s.observe([now - op.submitted_s for op in ops])
        for op in ops:
            op.session.last_step_s = used_s

    def record_many(self, op) -> None:
        """One executed StepMany: a step of each of its sessions."""
        sessions = len(op.sessions)
        with self._lock:
            self.steps += sessions
            self.timesteps += sessions * op.inputs.shape[1]
            self.batch_size.observe((sessions,))
            latency_s = time.perf_counter() - op.submitted_s
            self.step_latency_s.observe([latency_s] * sessions)
        used_s = time.monotonic()
        for session in op.sessions:
            session.last_step_s = used_s


class Metrics:
    """The metrics of one server. Thread-safe."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        self.models: dict[str, ModelStats] = {}
        self.core = None  # set by `attach` once the models are loaded
        self._http = None
        self._started = prometheus_client.Counter(
            "seqserve_sessions_started",
            "Sessions started, by model and how (new, restored from a snapshot, or "
            "imported).",
            ["model", "reason"],
            registry=self.registry,
        )
        self._ended = prometheus_client.Counter(
            "seqserve_sessions_ended",
            "Sessions ended, by model and reason (closed, idle_timeout, evicted).",
            ["model", "reason"],
            registry=self.registry,
        )
        self._rejected = prometheus_client.Counter(
            "seqserve_requests_rejected",
            "Requests and stream steps refused, by gRPC status code.",
            ["code"],
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(self))

    def attach(self, core) -> None:
        """Starts reporting the core's models; their counters start at zero."""
        for name in core.models:
            for reason in STARTED_REASONS:
                self._started.labels(name, reason)
            for reason in ENDED_REASONS:
                self._ended.labels(name, reason)
        self.core = core

    def stats_for(self, model: str) -> ModelStats:
        return self.models.setdefault(model, ModelStats())

    def session_started(self, model: str, reason: str = "new") -> None:
        """`reason` "restored" is for sessions brought back from a snapshot,
        "imported" for those from ImportSession."""
        self._started.labels(model, reason).inc()

    def session_ended(self, model: str, reason: str, count: int = 1) -> None:
        self._ended.labels(model, reason).inc(count)

    def rejected(self, code: grpc.StatusCode) -> None:
        self._rejected.labels(code.name).inc()

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP; returns the bound port (port 0: any free)."""
        self._http, _ = prometheus_client.start_http_server(
            port, addr=host, registry=self.registry
        )
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def summary(self) -> str:
        """One line of totals for the shutdown log."""
        steps = sum(s.steps for s in self.models.values())
        timesteps = sum(s.timesteps for s in self.models.values())
        started = _total(self._started)
        ended = ", ".join(f"{_total(self._ended, r)} {r}" for r in ENDED_REASONS)
        return (
            f"served {steps} steps ({timesteps} timesteps); sessions started "
            f"{started}, ended {ended}; requests refused {_total(self._rejected)}"
        )


class _LiveCollector:
    """Figures read from the core at scrape time, and the executors' counts."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        core = self.metrics.core
        if core is not None:
            yield from _live_families(core)
        yield from _served_families(self.metrics.models)


def _live_families(core):
    live = GaugeMetricFamily(
        "seqserve_sessions_live", "Sessions live now, by model.", labels=["model"]
    )
    held = GaugeMetricFamily(
        "seqserve_session_state_bytes",
        "Recurrent state held for live sessions, by model.",
        labels=["model"],
    )
    queued = GaugeMetricFamily(
        "seqserve_queue_depth",
        "Operations waiting for the model's executor.",
        labels=["model"],
    )
    # By version: versions of one model may differ in their state layout.
    counts = collections.Counter((s.model, s.version) for s in core.sessions.snapshot())
    for name in sorted(core.models):
        versions = [(v, n) for (m, v), n in counts.items() if m == name]
        live.add_metric([name], sum(n for _, n in versions))
        held.add_metric([name], sum(n * _row_bytes(core, name, v) for v, n in versions))
        queued.add_metric([name], core.queue_depth(name))
    return live, held, queued


def _row_bytes(core, name: str, version: int) -> int:
    """Bytes of one session's state on a model version (float32 parts)."""
    entry = core.versions.get((name, version))
    if entry is None:  # unloaded since: its last session ended meanwhile
        return 0
    model, _ = entry
    return 4 * sum(p.units for p in model.state_parts)


def _served_families(models: dict[str, ModelStats]):
    steps = CounterMetricFamily(
        "seqserve_steps", "Session steps applied, by model.", labels=["model"]
    )
    timesteps = CounterMetricFamily(
        "seqserve_timesteps", "Timesteps applied, by model.", labels=["model"]
    )
    latency = HistogramMetricFamily(
        "seqserve_step_latency_seconds",
        "From a step's submission to its result, queueing included.",
        labels=["model"],
    )
    batch = HistogramMetricFamily(
        "seqserve_batch_size",
        "Session steps in one model execution.",
        labels=["model"],
    )
    for name, stats in sorted(models.items()):
        steps.add_metric([name], stats.steps)
        timesteps.add_metric([name], stats.timesteps)
        for family, histogram in (
            (latency, stats.step_latency_s),
            (batch, stats.batch_size),
        ):
            family.add_metric([name], histogram.buckets(), histogram.sum)
    return steps, timesteps, latency, batch


def _total(counter, reason: str | None = None) -> int:
    samples = next(iter(counter.collect())).samples
    return int(
        sum(
            s.value
            for s in samples
            if s.name.endswith("_total")
            and (reason is None or s.labels.get("reason") == reason)
        )
    )


def _bound(value: float) -> str:
    return prometheus_client.utils.floatToGoString(float(value))
