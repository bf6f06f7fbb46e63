"""HeadlessTaskQueue and GenerationTask: the Python API of the worker, and the model-owning runner.

Python users and SQL users share one queue: `submit_task` writes the same `tasks` table that a raw
INSERT does, and `start()` runs the same worker loop as `wan-worker run`. One model is resident at a
time; the runner switches only when the next task needs another one (the claim prefers tasks for the
resident model, see worker.loop.scheduling).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from wan_engine.presets import BUILTIN_PRESETS_DIR, PresetRegistry, load_presets, split_dirs
from worker.config import WorkerSettings
from worker.live.events import LiveSink, live_sink
from worker.loop.events import EventSink
from worker.loop.worker import Worker
from worker.store.hw_table import table_layout
from worker.store.migrate import upgrade_to_head
from worker.store.repository import SqlTaskRepository
from worker.store.schema import DEFAULT_DB_URL, create_db_engine
from worker.task import NewTask, Task, TaskStatus, output_file
from worker.tasks.params import validate_priority
from worker.tasks.runner import GenerationRunner
from worker.tasks.travel import DEFAULT_TRAVEL_MODEL
from worker.tasks.validation import validate_task

if TYPE_CHECKING:
    from headless_wgp import WanOrchestrator

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.2
ABORT_JOIN_S = 60.0  # an aborted task stops at its next step; a loaded machine may make that one slow


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

    def hw_result(self) -> dict[str, Any]:
        """The dict Headless-Wan2GP's `wait_for_completion` returns: `success`, `output_path`, `error`."""
        path = output_file(self.output_location, self.result_data)
        return {"success": self.status is TaskStatus.COMPLETE, "output_path": path, "error": self.error_message}

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style reads, so Headless-Wan2GP scripts (`result.get("success")`) run unchanged; any other
        key reads the field of that name."""
        hw = self.hw_result()
        return hw[key] if key in hw else getattr(self, key, default)

    def __getitem__(self, key: str) -> Any:
        hw = self.hw_result()
        if key in hw:
            return hw[key]
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        raise KeyError(key)

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


class HeadlessTaskQueue:
    """The persistent task queue: submit, watch, cancel, and run the worker loop in this process."""

    def __init__(
        self,
        db_url: str = DEFAULT_DB_URL,
        *,
        models_dir: str | Path = "models",
        outputs_dir: str | Path = "outputs",
        presets_dir: str | Path | Sequence[str | Path] | None = None,
        loras_dir: str | Path | Sequence[str | Path] | None = None,
        settings: WorkerSettings | None = None,
        orchestrator: WanOrchestrator | None = None,
        events: EventSink | None = None,
        wan_dir: str | Path | None = None,
        max_workers: int = 1,
    ) -> None:
        """`wan_dir` and `max_workers` are Headless-Wan2GP's arguments, so its scripts run unchanged: `wan_dir`
        (a Wan2GP checkout) supplies the models (`ckpts/`), the definitions (`defaults/`, `finetunes/`) and
        the LoRAs (`loras/`) where those arguments are not given; one queue runs one model at a time, so
        `max_workers` must be 1 (run more workers as more processes)."""
        if max_workers != 1:
            raise ValueError(
                f"max_workers={max_workers!r}: a queue runs one task at a time on one resident model; use 1 and "
                "start more `wan-worker run` processes (or --gpus) for more"
            )
        if wan_dir is not None:
            root = Path(wan_dir).expanduser()
            if models_dir == "models":
                models_dir = root / "ckpts"
            if presets_dir is None:
                presets_dir = [d for d in (root / "defaults", root / "finetunes") if d.is_dir()] or None
            if loras_dir is None and (root / "loras").is_dir():
                loras_dir = root / "loras"
        self.settings = settings or WorkerSettings(
            db_url=db_url,
            models_dir=Path(models_dir),
            outputs_dir=Path(outputs_dir),
            presets_dir=split_dirs(presets_dir) or None,  # several folders: later ones override
            loras_dirs=split_dirs(loras_dir),
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
        self._early_stops = 0  # stop requests that came before the worker existed (start-up)
        self._worker_error: BaseException | None = None  # what ended the start() thread (see worker_error)

    # ---- submitting and watching ----------------------------------------------------------------

    def submit_task(self, task: GenerationTask) -> str:
        """Validate and queue a task of any submittable type (same table as SQL users); returns its id.

        Bad input raises ValueError with the message the worker would write on the row. `task_type` defaults
        from the model's preset. For `travel_orchestrator` the params are the travel schema's
        (`input_images`, `base_prompts`, `segment_frames`, ...): `prompt` stands for `base_prompts` when the
        parameters have none (otherwise it is not used). `travel_segment` / `travel_stitch` are refused: the
        orchestrator creates them.
        """
        if task.task_type == "travel_orchestrator":
            params: dict[str, Any] = {"model": task.model, **task.parameters}
            if "base_prompts" not in params and task.prompt:
                params["base_prompts"] = task.prompt
            task_type = task.task_type
        else:
            task_type = task.task_type or self.presets.get(task.model).model.architecture
            params = {"model": task.model, "prompt": task.prompt, **task.parameters}
        # The runner's own checks (schema, architecture, engine resolver, scheduler steps; the travel schema and
        # plan): a task that gets in here is not then failed by the worker for its params.
        validate_task(task_type, params, self.presets, self.settings.models_dir)
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

    def submit_travel(
        self,
        input_images: Sequence[str | Path],
        prompts: str | Sequence[str],
        *,
        model: str | None = None,
        segment_frames: int | Sequence[int] = 81,
        frame_overlap: int | Sequence[int] = 8,
        resolution: str | None = None,
        seed_base: int = -1,
        priority: int = 0,
        **settings: Any,
    ) -> str:
        """Queue a travel between `input_images` (a `travel_orchestrator` row); returns its id.

        `prompts`: one prompt, or one per segment (len(input_images) - 1). `model`: a VACE preset (None: the
        worker's default, `vace_14B_cocktail_2_2`). `settings`: further travel keys (`num_inference_steps`,
        `fps`, `crossfade_sharpen`, `negative_prompts`, ...). Validated like `submit_task` (ValueError).
        """
        parameters: dict[str, Any] = {
            "input_images": [str(image) for image in input_images],
            "base_prompts": prompts if isinstance(prompts, str) else list(prompts),
            "segment_frames": segment_frames if isinstance(segment_frames, int) else list(segment_frames),
            "frame_overlap": frame_overlap if isinstance(frame_overlap, int) else list(frame_overlap),
            "seed_base": seed_base,
            **settings,
        }
        if resolution is not None:
            parameters["resolution"] = resolution
        return self.submit_task(
            GenerationTask(
                model=model or DEFAULT_TRAVEL_MODEL,
                prompt="",
                parameters=parameters,
                task_type="travel_orchestrator",
                priority=priority,
            )
        )

    def get_task_status(self, task_id: str) -> TaskInfo | None:
        task = self.repository.get(task_id)
        return TaskInfo.from_task(task) if task else None

    def wait_for_completion(self, task_id: str, timeout: float | None = None) -> TaskInfo:
        """Block until the task is Complete, Failed or Cancelled; TimeoutError after `timeout` seconds.

        RuntimeError (chained to the worker thread's exception) as soon as the background thread that
        `start()` began has died: nothing in this process would ever run the task (another worker may, but
        then wait on the table, not on this queue).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.get_task_status(task_id)
            if info is None:
                raise KeyError(f"no task with id {task_id!r}")
            if info.status.is_final:
                return info
            error = self._worker_error
            if error is not None:
                raise RuntimeError(
                    f"task {task_id} is still {info.status.value}: the worker thread died: "
                    f"{type(error).__name__}: {error}"
                ) from error
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {info.status.value} after {timeout}s")
            time.sleep(WAIT_POLL_S)

    @property
    def worker_error(self) -> BaseException | None:
        """The exception that ended the background worker thread (preload included); None while it runs or
        after a clean stop."""
        return self._worker_error

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task; False if it had already ended (or does not exist)."""
        return self.repository.cancel(task_id)

    def get_queue_status(self) -> dict[str, Any]:
        """Pending tasks by priority, the current task and model, counters, uptime and memory."""
        counts = self.repository.counts_by_status()
        worker, runner = self.worker, self.runner
        current = (worker.current_task or worker.finishing_task) if worker else None
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

    def prepare(self) -> None:
        """Build the orchestrator now, in this thread: it warms the process for its first load
        (wan_engine.process_warmup); the worker loop builds it otherwise. `wan-worker run` calls this before
        its HTTP server starts, so no other thread imports while the warm-up does."""
        if self._orchestrator is None:
            from headless_wgp import WanOrchestrator

            self._orchestrator = WanOrchestrator(
                self.settings.models_dir,
                self.presets,
                allow_download=self.settings.allow_download,
                loras_dir=self.settings.loras_dirs or None,  # None: the worker's own loras/
            )

    def _build_worker(self) -> Worker:
        if self.worker is None:
            self.prepare()
            self.runner = GenerationRunner(
                self._orchestrator,
                self.settings.outputs_dir,
                tuple(self.settings.input_roots),
                self.repository,
                allow_fallbacks=self.settings.allow_fallbacks,
                group_size=self.settings.parallel,
                hw_table=table_layout(self.engine).hw,
            )
            if self.events is None:
                self.events = live_sink(self.repository, self.presets, self.settings.models_dir)
            self.worker = Worker(self.repository, self.runner, self.settings, events=self.events)
            for _ in range(self._early_stops):
                self.worker.request_stop()
        return self.worker

    def run_forever(self, preload_model: str | None = None, until_idle: bool = False) -> None:
        """Serve tasks in this thread until `request_stop` (or until idle, with until_idle)."""
        worker = self._build_worker()
        if worker.stop_requested.is_set():
            log.warning(
                "stop requested during start-up; no task was claimed", extra={"worker_id": self.settings.worker_id}
            )
            return
        preload = preload_model or self.settings.preload_model
        if preload:
            assert self.runner is not None
            self.runner.ensure_model(preload)
        worker.run_forever(until_idle=until_idle)

    def start(self, preload_model: str | None = None) -> None:
        """Run the worker loop in a background thread (the seeds' `queue.start()`).

        A failure in that thread (a preload whose weights are missing, a lost database) is logged once and
        kept: `worker_error`, and `wait_for_completion` raises it instead of polling on.
        """
        if self._thread and self._thread.is_alive():
            return
        self._build_worker()
        from wan_engine.pipeline_runtime import import_diffusers_classes

        import_diffusers_classes()  # here, not racing the thread (see there)
        self._worker_error = None
        self._thread = threading.Thread(target=self._run_thread, args=(preload_model,), name="wan-worker", daemon=True)
        self._thread.start()

    def _run_thread(self, preload_model: str | None) -> None:
        """The background thread's target: `run_forever`, its exception recorded rather than printed by
        threading's excepthook (a bare traceback on stderr that no caller sees)."""
        try:
            self.run_forever(preload_model)
        except BaseException as exc:  # whatever ended the thread is what the waiters must see
            self._worker_error = exc
            log.error(
                "worker thread stopped: %s: %s",
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
                extra={"worker_id": self.settings.worker_id},
            )

    def __enter__(self) -> HeadlessTaskQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """`with HeadlessTaskQueue(...) as queue:` closes the queue (stop, events, connections) on exit."""
        self.close()

    def use_live_events(self, publish: bool = True) -> LiveSink:
        """Build and install the live sink (ETA, resource monitor; an outbox for the live server when
        `publish`); returns it. Call before the worker starts: the worker keeps the sink it was built with."""
        if self.worker is not None:
            raise RuntimeError("use_live_events() must be called before the worker is built")
        sink = live_sink(self.repository, self.presets, self.settings.models_dir, publish=publish)
        self.events = sink
        return sink

    def resident_model(self) -> str | None:
        """The model loaded on the device now (None before the first task or preload)."""
        return self.runner.resident_model() if self.runner else None

    def seconds_since_loop_activity(self) -> float | None:
        """Seconds since the worker loop last showed life (None before it starts): see /healthz."""
        return self.worker.seconds_since_activity() if self.worker is not None else None

    @property
    def stop_requested(self) -> bool:
        """True once a stop was requested (`request_stop`): a further request aborts the current task."""
        if self.worker is None:
            return self._early_stops > 0
        return self.worker.stop_requested.is_set()

    def request_stop(self) -> None:
        """Graceful stop (finish the current task); a second call abandons and re-queues it. A request before
        the worker exists (start-up) is kept and applied when it is built."""
        if self.worker is not None:
            self.worker.request_stop()
        else:
            self._early_stops += 1

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
        self.dispose()

    def dispose(self) -> None:
        """Release the database connections only: no stop, the events are left as they are (`close` does all)."""
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
