"""The Prometheus metrics behind `/metrics`, shaped for a fleet of workers scraped by one Prometheus.

Two kinds of series, kept apart so that summing over a fleet never double-counts:

- **Per-worker** series carry a `worker_id` label (this process's `--worker-id`): step times, finished
  tasks by outcome, GPU and process memory, the current task's ETA, live clients, dropped events. Sum or
  compare them across workers freely.
- **Table-wide** gauges describe the shared tasks table, which every worker sees identically: they are
  named `wan_table_*` and carry **no** `worker_id` label. Every worker exports the same value, so
  aggregate them with `max` (never `sum`) across scrape targets: `max(wan_table_queue_depth)`.
  (deploy/grafana/wan-worker-dashboard.json and deploy/prometheus/alerts.yml do.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from worker.task import TaskStatus

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
OUTCOMES = ("completed", "failed", "cancelled")

# Every metric name /metrics can export (tests check the dashboard and alert rules against it).
TABLE_METRICS = ("wan_table_tasks", "wan_table_queue_depth")
WORKER_METRICS = (
    "wan_step_seconds",
    "wan_worker_tasks_total",
    "wan_worker_up",
    "wan_worker_start_time_seconds",
    "wan_process_resident_memory_bytes",
    "wan_gpu_memory_used_bytes",
    "wan_gpu_memory_total_bytes",
    "wan_gpu_utilization_percent",
    "wan_gpu_temperature_celsius",
    "wan_current_task_eta_seconds",
    "wan_current_task_progress_ratio",
    "wan_live_clients",
    "wan_events_dropped",
)


class _ScrapeCollector:
    """Gauges read at scrape time from the live server (the table, the monitor, the hub)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server, worker = self.server, [self.server.worker_id or ""]
        counts = server.repository.counts_by_status()
        tasks = GaugeMetricFamily("wan_table_tasks", "Rows of the shared tasks table by status", labels=["status"])
        for status in TaskStatus:
            tasks.add_metric([status.value], counts.get(status.value, 0))
        yield tasks
        queued = counts.get(TaskStatus.QUEUED.value, 0)
        yield GaugeMetricFamily("wan_table_queue_depth", "Queued rows of the shared tasks table", value=queued)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["worker_id"])
            family.add_metric(worker, value)
            return family

        yield gauge(
            "wan_worker_up",
            "1 while this worker's loop runs and is not stalled",
            1.0 if server.loop_health()["ok"] else 0.0,
        )
        yield gauge("wan_worker_start_time_seconds", "Unix time this worker's live server started", server.started_at)
        sample = server.sink.monitor.latest if server.sink.monitor else None
        if sample is not None:
            yield gauge("wan_process_resident_memory_bytes", "Worker RSS", sample.rss_bytes)
            gpu = sample.gpu
            if gpu is not None:
                yield gauge("wan_gpu_memory_used_bytes", "GPU memory in use", gpu.used_bytes)
                yield gauge("wan_gpu_memory_total_bytes", "GPU memory", gpu.total_bytes)
                if gpu.utilization_percent is not None:
                    yield gauge("wan_gpu_utilization_percent", "GPU busy", gpu.utilization_percent)
                if gpu.temperature_c is not None:
                    yield gauge("wan_gpu_temperature_celsius", "GPU temperature", gpu.temperature_c)
        progress = (server.hub.current or {}).get("progress") or {}
        if progress.get("eta_seconds") is not None:
            yield gauge("wan_current_task_eta_seconds", "Seconds left in the current task", progress["eta_seconds"])
        if progress.get("percent") is not None:
            yield gauge("wan_current_task_progress_ratio", "Current task's progress, 0..1", progress["percent"] / 100)
        yield gauge("wan_live_clients", "WebSocket clients", server.hub.client_count)
        yield gauge("wan_events_dropped", "Events the live server missed", server.sink.dropped)


class Metrics:
    """The registry behind /metrics; step times and outcomes are counted from the event stream."""

    def __init__(self, server: Any, worker_id: str | None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ScrapeCollector(server))  # type: ignore[arg-type]
        label = worker_id or ""
        self.steps = Histogram(
            "wan_step_seconds", "Denoising step time", ["worker_id"], buckets=STEP_BUCKETS, registry=self.registry
        ).labels(label)
        outcomes = Counter(
            "wan_worker_tasks", "Tasks this worker process finished", ["worker_id", "outcome"], registry=self.registry
        )
        self._outcome: Callable[[str], Any] = lambda outcome: outcomes.labels(label, outcome)
        for outcome in OUTCOMES:
            self._outcome(outcome)

    def on_event(self, event: dict[str, Any]) -> None:
        name = event["event"]
        if name == "generation_completed":
            self._outcome("completed").inc()
            for seconds in event.get("step_times") or []:
                self.steps.observe(seconds)
        elif name == "generation_failed" and not event.get("retrying"):
            self._outcome("failed").inc()
        elif name == "task_cancelled" and event.get("by") == "worker":
            self._outcome("cancelled").inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
