"""HeadlessTaskQueue and GenerationTask: the Python API of the worker, and the model-owning runner.

Python users and SQL users share one queue: `submit_task` writes the same `tasks` table that a raw
INSERT does, and `start()` runs the same worker loop as `wan-worker run`. One model is resident at a
time; the runner switches only when the next task needs another one (the claim prefers tasks for the
resident model, see worker.scheduling).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from wan_engine.errors import ModelUnavailableError
from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets
from wan_engine.video_io import remove_partial_files
from worker.config import WorkerSettings
from worker.db import DEFAULT_DB_URL, create_db_engine
from worker.events import EventSink, live_sink
from worker.loop import RunContext, Worker
from worker.migrate import upgrade_to_head
from worker.params import (
    PARALLEL_MODES,
    TASK_TYPE_MODES,
    GenerationParams,
    InvalidTaskError,
    check_parallel_mode,
    model_key_for,
    parallel_requested,
    parse_params_text,
    validate_params,
    validate_priority,
)
from worker.paths import output_stem, resolve_input_path
from worker.repository import SqlTaskRepository
from worker.task import NewTask, Task, TaskDeferred, TaskOutcome, TaskStatus
from worker.travel import TRAVEL_TASK_TYPES, TravelCoordinator, TravelSegmentParams, TravelStore

if TYPE_CHECKING:
    from headless_wgp import WanOrchestrator

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.2
ABORT_JOIN_S = 60.0  # an aborted task stops at its next step; a loaded machine may make that one slow
# The preset architectures each task mode accepts (the orchestrator checks what the weights can do).
MODE_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "t2v": ("t2v", "ti2v"),
    "vace": ("vace",),
    "i2v": ("i2v", "flf2v", "ti2v"),
    "flf2v": ("flf2v", "i2v"),
    "ti2v": ("ti2v",),
}


@dataclass(frozen=True)
class GenerationTask:
    """A task as Python users submit it (the seeds' API). `task_type` defaults from the model's preset."""

    model: str
    prompt: str
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    task_type: str | None = None
    priority: int = 0
    dependant_on: str | None = None
    max_attempts: int = 3


@dataclass(frozen=True)
class TaskInfo:
    """A task's state as read back from the table."""

    id: str
    status: TaskStatus
    output_location: str | None
    error_message: str | None
    progress: dict[str, Any] | None
    result_data: dict[str, Any] | None
    attempts: int

    @classmethod
    def from_task(cls, task: Task) -> TaskInfo:
        return cls(
            task.id,
            task.status,
            task.output_location,
            task.error_message,
            task.progress,
            task.result_data,
            task.attempts,
        )


class GenerationRunner:
    """Runs a claimed task on the resident model; switches models only when the task needs another."""

    def __init__(
        self,
        orchestrator: WanOrchestrator,
        outputs_dir: Path,
        input_roots: tuple[Path, ...] = (),
        store: TravelStore | None = None,
        allow_fallbacks: bool = False,
        group_size: int = 1,
    ) -> None:
        self.orchestrator = orchestrator
        self.allow_fallbacks = allow_fallbacks
        self.group_size = group_size  # ranks every generation runs on (worker.parallel); 1: this process alone
        self.outputs_dir = outputs_dir
        self.input_roots = tuple(input_roots)  # input files are read only from here and outputs_dir
        self.model_loads = 0
        self.model_switches = 0
        self.load_seconds = 0.0
        self.travel = (
            TravelCoordinator(store, outputs_dir, self.input_roots, self._travel_resolution) if store else None
        )

    def resident_model(self) -> str | None:
        return self.orchestrator.current_model

    def model_for(self, task: Task) -> str | None:
        if task.task_type in ("travel_orchestrator", "travel_stitch"):
            return None  # bookkeeping and ffmpeg only: no model needed
        return model_key_for(task.task_type, task.params_text)

    def parallel_for(self, task: Task) -> int:
        """GPUs the task asks for: its `parallel`, else its model preset's, else 1."""
        requested = parallel_requested(task.params_text)
        if requested is not None:
            return requested
        model = model_key_for(task.task_type, task.params_text)
        if model is None or model not in self.orchestrator.presets:
            return 1
        return self.orchestrator.presets.get(model).settings.parallel or 1

    def claimable(self, task: Task) -> bool:
        """The claim rule: a worker whose group has G ranks runs every task it claims on all G of them, so
        it claims the tasks that ask for at most G GPUs and that it can split G ways (one GPU: parallel 1
        only; a group: not VACE, whose transformer diffusers cannot split). Travel orchestration and
        stitching load no model and run anywhere."""
        if task.task_type in ("travel_orchestrator", "travel_stitch"):
            return True
        if self.parallel_for(task) > self.group_size:
            return False
        if self.group_size == 1:
            return True
        return TASK_TYPE_MODES.get(task.task_type) in PARALLEL_MODES

    def ensure_model(self, model_key: str, context: RunContext | None = None) -> float | None:
        """Load `model_key` unless it is resident; returns the seconds spent loading (None: no load)."""
        previous = self.orchestrator.current_model
        if previous == model_key:
            return None
        if context is not None:
            context.report("loading_model", model=model_key)
        seconds = self.orchestrator.load_model(model_key)
        self.model_loads += 1
        self.model_switches += previous is not None
        self.load_seconds += seconds
        log.info("loaded model in %.2fs (previous: %s)", seconds, previous, extra={"model": model_key})
        return seconds

    def run(self, task: Task, context: RunContext) -> TaskOutcome | TaskDeferred:
        validate_priority(task.priority)  # rows from other programs: refused before anything loads
        if task.task_type in TRAVEL_TASK_TYPES:
            return self._run_travel(task, context)
        params = validate_params(task.task_type, parse_params_text(task.params_text))
        mode = TASK_TYPE_MODES[task.task_type]
        self._check_model(params, mode)
        self._check_parallel(params, mode)
        inputs = self._input_paths(params)  # before loading anything: a bad path fails at once
        context.check()
        _ran, load_s, fallback = self._ensure_model_or_fallback(str(params.model), context)
        context.check()
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        output_path = self.outputs_dir / f"{output_stem(task.id)}.mp4"
        for stale in remove_partial_files(output_stem(task.id), self.outputs_dir):  # left by a killed attempt
            log.warning("removed a killed attempt's partial output %s", stale.name, extra={"task_id": task.id})
        generate = self.orchestrator.generate_t2v
        if mode == "vace":
            generate = self.orchestrator.generate_vace
        elif mode in ("i2v", "flf2v") or (mode == "ti2v" and "image_start" in inputs):
            generate = self.orchestrator.generate_i2v
        result = generate(
            params.prompt,
            output_path=output_path,
            progress=lambda event: context.report(event.stage, event.step, event.total_steps),
            **inputs,
            **params.generation_kwargs(),
        )
        result_data = {
            **result.to_dict(),
            "model_loaded": load_s is not None,
            "load_seconds": round(load_s or 0.0, 3),
            "model_fallback": fallback,
            "attempt": task.attempts,
            "worker_id": context.worker_id,
        }
        return TaskOutcome(str(result.output_path), result_data)

    def _ensure_model_or_fallback(
        self, model_key: str, context: RunContext
    ) -> tuple[str, float | None, dict[str, str] | None]:
        """Load the task's model; when its weights are unavailable and fallbacks are allowed, the first
        loadable preset of its `fallbacks` list (the seeds' alternative models). Returns the model that
        ran, the load time and what was substituted (None: no substitution)."""
        try:
            return model_key, self.ensure_model(model_key, context), None
        except ModelUnavailableError as exc:
            spec = self.orchestrator.presets.get(model_key).model
            alternatives = spec.fallbacks
            if not (self.allow_fallbacks and alternatives):
                raise
            for alternative in alternatives:
                if self.orchestrator.presets.get(alternative).model.architecture != spec.architecture:
                    continue  # a fallback must run the same mode with the same inputs
                try:
                    load_s = self.ensure_model(alternative, context)
                except ModelUnavailableError:
                    continue
                log.warning("model unavailable, ran fallback %s", alternative, extra={"model": model_key})
                return alternative, load_s, {"requested": model_key, "ran": alternative, "reason": str(exc)[:500]}
            raise ModelUnavailableError(f"{exc} Fallbacks {', '.join(alternatives)} are unavailable too.") from exc

    # ---- travel between images ---------------------------------------------------------------------

    def _run_travel(self, task: Task, context: RunContext) -> TaskOutcome | TaskDeferred:
        if self.travel is None:
            raise InvalidTaskError(f"{task.task_type} tasks need a worker with a task store (the daemon)")
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        if task.task_type == "travel_orchestrator":
            return self.travel.run_orchestrator(task)
        if task.task_type == "travel_stitch":
            return self.travel.run_stitch(task, context.report)

        def generate(
            params: TravelSegmentParams,
            guide: np.ndarray,
            mask: np.ndarray,
            output_path: Path,
            progress: Callable[[str, int, int], None],
        ) -> dict[str, Any]:
            load_s = self.ensure_model(params.model, context)
            context.check()
            result = self.orchestrator.generate_vace(
                params.prompt,
                video_guide=guide,
                video_mask=mask,
                output_path=output_path,
                progress=lambda event: progress(event.stage, event.step, event.total_steps),
                **params.generation_kwargs(),
            )
            return {**result.to_dict(), "model_loaded": load_s is not None, "load_seconds": round(load_s or 0.0, 3)}

        return self.travel.run_segment(task, generate, context.report, context.report_parent)

    def _travel_resolution(self, model: str, resolution: str | None) -> tuple[int, int]:
        """The (width, height) a travel runs at: its resolution param, else the VACE model's preset."""
        preset = self.orchestrator.presets.get(model)
        if preset.model.architecture != "vace":
            raise InvalidTaskError(f"travel needs a VACE model; {model!r} is a {preset.model.architecture} model")
        value = resolution or preset.settings.resolution or ""
        width, _, height = value.partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) % 16 or int(height) % 16:
            raise InvalidTaskError(f"resolution = {value!r}: must look like '832x480' with multiples of 16")
        return int(width), int(height)

    def _input_paths(self, params: GenerationParams) -> dict[str, Any]:
        """The mode's keys with every file path resolved inside the input roots / outputs dir."""
        kwargs = params.mode_kwargs()
        roots = list(self.input_roots)
        for key in params.PATH_KEYS:
            value = kwargs.get(key)
            if isinstance(value, list):
                kwargs[key] = [
                    resolve_input_path(v, roots, self.outputs_dir, key=f"{key}[{i}]") for i, v in enumerate(value)
                ]
            elif value is not None:
                kwargs[key] = resolve_input_path(value, roots, self.outputs_dir, key=key)
        return kwargs

    def _check_parallel(self, params: GenerationParams, mode: str) -> None:
        """A preset's `parallel` (the task's is checked with its params) and the group this worker has."""
        parallel = params.parallel or self.orchestrator.presets.get(str(params.model)).settings.parallel or 1
        check_parallel_mode(mode, max(parallel, self.group_size))
        if parallel > self.group_size:
            raise InvalidTaskError(
                f"parallel = {parallel}: this worker runs generations on {self.group_size} GPU(s); start a group "
                f"with `wan-worker run --parallel {parallel}`"
            )

    def _check_model(self, params: GenerationParams, mode: str) -> None:
        preset = self.orchestrator.presets.get(str(params.model))
        allowed = MODE_ARCHITECTURES[mode]
        if preset.model.architecture not in allowed:
            raise InvalidTaskError(
                f"model {params.model!r} is a {preset.model.architecture} model; {mode} tasks need one of "
                f"architecture {', '.join(allowed)}"
            )


class HeadlessTaskQueue:
    """The persistent task queue: submit, watch, cancel, and run the worker loop in this process."""

    def __init__(
        self,
        db_url: str = DEFAULT_DB_URL,
        *,
        models_dir: str | Path = "models",
        outputs_dir: str | Path = "outputs",
        presets_dir: str | Path | None = None,
        settings: WorkerSettings | None = None,
        orchestrator: WanOrchestrator | None = None,
        events: EventSink | None = None,
    ) -> None:
        self.settings = settings or WorkerSettings(
            db_url=db_url,
            models_dir=Path(models_dir),
            outputs_dir=Path(outputs_dir),
            presets_dir=Path(presets_dir) if presets_dir else None,
        )
        self.engine = create_db_engine(self.settings.db_url)
        upgrade_to_head(self.engine)
        self.repository = SqlTaskRepository(self.engine)
        self.presets: PresetRegistry = (
            orchestrator.presets if orchestrator else load_presets(BUILTIN_PRESETS_DIR, self.settings.presets_dir)
        )
        self._orchestrator = orchestrator
        self.runner: GenerationRunner | None = None
        self.worker: Worker | None = None
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self.events = events  # None: a LiveSink (ETA, monitoring) is built with the worker

    # ---- submitting and watching ----------------------------------------------------------------

    def submit_task(self, task: GenerationTask) -> str:
        """Validate and queue a task (same table as SQL users); returns its id. Bad input raises ValueError."""
        preset = self.presets.get(task.model)
        task_type = task.task_type or preset.model.architecture
        params = {"model": task.model, "prompt": task.prompt, **task.parameters}
        validate_params(task_type, params)
        validate_priority(task.priority)
        return self.repository.insert(
            NewTask(
                task_type=task_type,
                params=params,
                id=task.id,
                priority=task.priority,
                dependant_on=task.dependant_on,
                max_attempts=task.max_attempts,
            )
        )

    def get_task_status(self, task_id: str) -> TaskInfo | None:
        task = self.repository.get(task_id)
        return TaskInfo.from_task(task) if task else None

    def wait_for_completion(self, task_id: str, timeout: float | None = None) -> TaskInfo:
        """Block until the task is Complete, Failed or Cancelled; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.get_task_status(task_id)
            if info is None:
                raise KeyError(f"no task with id {task_id!r}")
            if info.status.is_final:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {info.status.value} after {timeout}s")
            time.sleep(WAIT_POLL_S)

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task; False if it had already ended (or does not exist)."""
        return self.repository.cancel(task_id)

    def get_queue_status(self) -> dict[str, Any]:
        """Pending tasks by priority, the current task and model, counters, uptime and memory."""
        counts = self.repository.counts_by_status()
        worker, runner = self.worker, self.runner
        current = worker.current_task if worker else None
        return {
            "pending_by_priority": self.repository.queued_by_priority(),
            "pending": counts.get(TaskStatus.QUEUED.value, 0),
            "in_progress": counts.get(TaskStatus.IN_PROGRESS.value, 0),
            "completed": counts.get(TaskStatus.COMPLETE.value, 0),
            "failed": counts.get(TaskStatus.FAILED.value, 0),
            "cancelled": counts.get(TaskStatus.CANCELLED.value, 0),
            "current_task": current.id if current else None,
            "current_model": runner.resident_model() if runner else None,
            "model_loads": runner.model_loads if runner else 0,
            "model_switches": runner.model_switches if runner else 0,
            "tasks_executed": worker.executed if worker else 0,
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "worker_id": self.settings.worker_id,
            "memory": _memory_status(),
        }

    # ---- running ----------------------------------------------------------------------------------

    def _build_worker(self) -> Worker:
        if self.worker is None:
            if self._orchestrator is None:
                from headless_wgp import WanOrchestrator

                self._orchestrator = WanOrchestrator(
                    self.settings.models_dir, self.presets, allow_download=self.settings.allow_download
                )
            self.runner = GenerationRunner(
                self._orchestrator,
                self.settings.outputs_dir,
                tuple(self.settings.input_roots),
                self.repository,
                allow_fallbacks=self.settings.allow_fallbacks,
                group_size=self.settings.parallel,
            )
            if self.events is None:
                self.events = live_sink(self.repository, self.presets, self.settings.models_dir)
            self.worker = Worker(
                self.repository, self.runner, self.settings, events=self.events, accept=self.runner.claimable
            )
        return self.worker

    def run_forever(self, preload_model: str | None = None, until_idle: bool = False) -> None:
        """Serve tasks in this thread until `request_stop` (or until idle, with until_idle)."""
        worker = self._build_worker()
        preload = preload_model or self.settings.preload_model
        if preload:
            assert self.runner is not None
            self.runner.ensure_model(preload)
        worker.run_forever(until_idle=until_idle)

    def start(self, preload_model: str | None = None) -> None:
        """Run the worker loop in a background thread (the seeds' `queue.start()`)."""
        if self._thread and self._thread.is_alive():
            return
        self._build_worker()
        self._thread = threading.Thread(target=self.run_forever, args=(preload_model,), name="wan-worker", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Graceful stop (finish the current task); a second call abandons and re-queues it."""
        if self.worker is not None:
            self.worker.request_stop()

    def stop(self, timeout: float | None = 60.0) -> bool:
        """Stop after the current task; if it is still running after `timeout`, abandon it (re-queued).
        Returns True when the loop has exited."""
        if self.worker is None or self._thread is None:
            return True
        self.worker.request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.worker.request_stop()  # second request: abort at the next step and give the task back
            self._thread.join(ABORT_JOIN_S)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Stop and release the database connections."""
        self.stop()
        close_events = getattr(self.events, "close", None)  # the live sink's monitor thread
        if close_events is not None:
            close_events()
        self.engine.dispose()


def _memory_status() -> dict[str, Any]:
    status: dict[str, Any] = {"rss_gb": round(psutil.Process(os.getpid()).memory_info().rss / 2**30, 3)}
    try:
        import torch

        if torch.cuda.is_available():
            status["vram_allocated_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            status["vram_reserved_gb"] = round(torch.cuda.memory_reserved() / 2**30, 3)
    except ImportError:
        pass
    return status
