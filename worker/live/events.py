"""The live sink behind progress, ETA and monitoring: the loop's `EventSink` (worker.loop.events) made real.

The loop calls its sink at claim, progress, completion, failure and cancel; the default is a no-op.
`LiveSink` (what `wan-worker run` and `HeadlessTaskQueue` use) adds `eta_seconds` and `vram_gb` to each
progress report, puts the monitor's peak / mean into result_data, folds the timings of each completed
task into the learned ETA table, and, when a live server runs, publishes events on a bounded queue.

An event is a JSON-able dict: `{"event": name, "ts": unix seconds, "task_id": id or None, ...}` with
names from `EVENT_TYPES`. The progress path does no I/O: events are put on the queue without blocking
(dropped, and counted, if the server falls behind).

Two threads call the hooks: the loop's (started, progress of the running task) and the output finisher's
(progress `writing_video`, completed / failed / cancelled of the task whose output it finished, issue 15), so
the hooks of two tasks interleave. Nothing here holds a lock across them (a finisher's `completed` does I/O and
must not stall the step loop): the outbox is a thread-safe queue, `dropped` is counted under `_lock`, the
monitor and the estimator guard their own state, and the monitor's window is closed only for its own task.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.live.eta import EtaEstimator, PresetShapes, decode_overlaps_here, detect_device
from worker.live.eta_static import StaticCostModel
from worker.live.monitor import ResourceMonitor
from worker.task import Task
from worker.tasks.params import model_key_for

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "task_queued",
    "generation_started",
    "progress",
    "generation_completed",
    "generation_failed",
    "task_cancelled",
    "vram_warning",
    "models_unavailable",
    "preview",
)
OUTBOX_SIZE = 4096


def make_event(name: str, task_id: str | None = None, **data: Any) -> dict[str, Any]:
    """One event dict (see the module docstring)."""
    return {"event": name, "ts": round(time.time(), 3), "task_id": task_id, **data}


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


class LiveSink:
    """ETA + monitoring + (optionally) events for a live server. Every hook swallows its own errors."""

    def __init__(
        self,
        estimator: EtaEstimator | None = None,
        monitor: ResourceMonitor | None = None,
        outbox_size: int | None = None,
    ) -> None:
        self.estimator = estimator
        self.monitor = monitor
        self.outbox: queue.Queue[dict[str, Any]] | None = queue.Queue(outbox_size) if outbox_size else None
        self.dropped = 0
        self.unavailable: dict[str, str] = {}  # model -> why, for pages opened later
        self._lock = threading.Lock()
        if monitor is not None:
            monitor.on_warning = self._vram_warning

    # ---- publishing ----

    def publish(self, name: str, task_id: str | None = None, **data: Any) -> None:
        """Queue an event for the server without blocking (dropped when the server falls behind)."""
        if self.outbox is None:
            return
        try:
            self.outbox.put_nowait(make_event(name, task_id, **data))
        except queue.Full:
            with self._lock:
                self.dropped += 1
                if self.dropped in (1, 100, 10_000):
                    log.warning("live server is behind: %d event(s) dropped", self.dropped)

    def _guard(self, what: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as exc:  # live feedback must never fail a task
            log.warning("%s failed: %s: %s", what, exc.__class__.__name__, exc)
            return None

    def _vram_warning(self, warning: dict[str, Any]) -> None:
        log.warning("GPU memory at %s%% of the budget (%s GiB)", warning["percent"], warning["budget_gb"])
        self.publish("vram_warning", warning.get("task_id"), **{k: v for k, v in warning.items() if k != "task_id"})

    def models_unavailable(self, models: dict[str, str]) -> None:
        """Report models whose weights are missing (start-up check, or a task that needed one)."""
        if not models:
            return
        self.unavailable.update(models)
        self.publish("models_unavailable", None, models=[{"model": k, "detail": v} for k, v in models.items()])

    # ---- the loop's hooks ----

    def started(self, task: Task, resident_model: str | None) -> None:
        estimator, monitor, eta = self.estimator, self.monitor, None
        if estimator is not None:
            eta = self._guard("ETA estimate", lambda: estimator.begin(task, resident_model))
        if monitor is not None:
            self._guard("monitor", lambda: monitor.begin_task(task.id))
        self.publish(
            "generation_started",
            task.id,
            task_type=task.task_type,
            model=model_key_for(task.task_type, task.params_text),
            priority=task.priority,
            attempt=task.attempts,
            eta_seconds=_round(eta, 2),
            eta_basis=estimator.basis(task.id) if estimator else None,
        )

    def progress(self, task: Task, progress: dict[str, Any]) -> None:
        try:
            if self.estimator is not None:
                progress["eta_seconds"] = _round(self.estimator.remaining(task.id, progress), 2)
                travel = self.estimator.travel_remaining(task.id) if task.parent_task_id else None
                if travel is not None:  # a travel segment: its orchestrator's remaining (later segments + stitch)
                    progress["travel_eta_seconds"] = _round(travel, 2)
            if self.monitor is not None:
                progress["vram_gb"] = self.monitor.vram_gb()
        except Exception as exc:
            log.debug("progress enrichment failed: %s", exc)
        self.publish("progress", task.id, **progress)

    def result_extras(self, task: Task) -> dict[str, Any]:
        # The loop asks when the task's GPU work ends (before its output is finished on the finisher thread,
        # worker.loop.finisher): a window the next task already opened is never closed for this one.
        if self.monitor is None or self.monitor.task_id != task.id:
            return {}
        summary = self._guard("monitor", self.monitor.end_task)
        return {"monitor": summary} if summary else {}

    def completed(self, task: Task, output: str | None, result: dict[str, Any]) -> None:
        estimator = self.estimator
        if estimator is not None:
            self._guard("ETA statistics update", lambda: estimator.record(task, result))
        timings = result.get("timings") or {}
        self.publish(
            "generation_completed",
            task.id,
            output_location=output,
            seconds=_round(timings.get("total"), 3),
            resolution=result.get("resolution"),
            frames=result.get("frames"),
            seed=result.get("seed"),
            mean_step=_round(timings.get("mean_step"), 4),
            step_times=[round(float(s), 4) for s in timings.get("step_times") or []],
            monitor=result.get("monitor"),
        )

    def failed(self, task: Task, error: BaseException, message: str, retrying: bool) -> None:
        self._end(task)
        self.publish("generation_failed", task.id, error=message, retrying=retrying)
        if any(cls.__name__ == "ModelUnavailableError" for cls in type(error).__mro__):
            model = model_key_for(task.task_type, task.params_text) or "?"
            self.models_unavailable({model: message})

    def cancelled(self, task: Task) -> None:
        self._end(task)
        self.publish("task_cancelled", task.id, by="worker")

    def _end(self, task: Task) -> None:
        if self.estimator is not None:
            self.estimator.finish(task.id)
        if self.monitor is not None and self.monitor.task_id == task.id:
            self._guard("monitor", self.monitor.end_task)

    def close(self) -> None:
        """Stop the monitor's thread (HeadlessTaskQueue.close)."""
        if self.monitor is not None:
            self.monitor.stop()


def live_sink(repository: Any, presets: Any, models_dir: Path, publish: bool = False) -> LiveSink:
    """The sink a real worker uses: learned + static ETA on this device, a started resource monitor,
    and an outbox for the live server when `publish`."""
    device = detect_device()
    profile = "cpu" if device == "cpu" else "gpu"
    estimator = EtaEstimator(
        repository,
        PresetShapes(presets, profile),
        device,
        StaticCostModel(presets, models_dir, device),
        decode_overlaps=decode_overlaps_here(device, profile),
    )
    return LiveSink(estimator, ResourceMonitor().start(), OUTBOX_SIZE if publish else None)
