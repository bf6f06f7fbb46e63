"""The worker loop: check stop, claim, execute with a lease keeper, persist the outcome. No SQL here.

It reads top to bottom like rq's SimpleWorker: tasks run in this process (the model stays resident),
one `except` per way out, cleanup in `finally`.

Publishing an output is conditional on still holding the claim. A runner writes its outputs under
attempt-unique staged names and registers them with `RunContext.stage`; nothing reaches the final name while
the task runs. `_persist_success` hands the rename to `mark_complete`, which performs it inside the guarded
transaction (status In Progress, this worker_id, this process's claim token), after the UPDATE matched and
while the row is locked. So the rename and the `Complete` write happen together or not at all: a worker that
stalled past its lease (SIGSTOP, a hung driver, a VM pause) and resumes after another worker completed the
task finds the guarded UPDATE unmatched, never renames, and deletes only its own staged file. No check-then-
rename window exists for another worker to complete in, since that worker needs the same lock to re-claim
or complete the row.

Output stage off the critical path (issue 15): a runner may return a `PendingFinish` (worker.loop.finisher)
once a generation's GPU work is done; its MP4 encode and write then run on the worker's one `OutputFinisher`
thread while this loop claims and starts the next task. The pending task keeps its claim and its lease keeper
until its outcome is persisted by the same code as above (the rename inside the guarded `Complete` write, a
cancel / lost lease / abort discarding the staged file, an encode error going through the retry policy). At
most one task is pending: handing off the next waits for it. A first stop waits for it; `run_forever` drains it
before returning.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from worker.config import DB_RETRY_MAX_S, WorkerSettings
from worker.loop.events import NULL_SINK, EventSink
from worker.loop.finisher import OutputFinisher, PendingFinish
from worker.loop.lease import LeaseKeeper
from worker.loop.retry import RetryPolicy, describe
from worker.loop.scheduling import ModelAffinity
from worker.store.repository import TaskRepository
from worker.task import Task, TaskDeferred, TaskOutcome, TaskStatus

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskCancelled(Exception):
    """The row was set to Cancelled (by a user) while it ran."""


class LeaseLost(Exception):
    """The row is no longer ours (lease expired and another worker took it)."""


class ShutdownAbort(Exception):
    """A second stop signal arrived: abandon the task and give it back to the queue."""


class StagedFiles(Protocol):
    """An attempt's finished outputs under staged names (wan_engine.video_io.StagedOutputs)."""

    def publish(self) -> None: ...
    def discard(self) -> None: ...


@dataclass
class RunContext:
    """What a runner gets besides the task: progress reporting, the stop/cancel checks, staged outputs."""

    task: Task
    worker_id: str
    lease: LeaseKeeper
    abort: threading.Event
    events: EventSink = NULL_SINK
    staged: list[StagedFiles] = field(default_factory=list)
    # The loop accepts a `PendingFinish` from this run (its output then finishes on the finisher thread).
    can_defer: bool = False
    travel_eta: float | None = None  # a travel segment's latest `travel_eta_seconds` (the sink adds it)
    on_activity: Callable[[], None] | None = None  # the loop's liveness clock (`Worker.seconds_since_activity`)

    def stage(self, files: StagedFiles) -> None:
        """Register outputs to publish with the `Complete` write (and to discard on any other ending)."""
        self.staged.append(files)

    def publish_staged(self) -> None:
        """Rename the staged outputs into place; called by `mark_complete` inside its guarded transaction."""
        for files in self.staged:
            files.publish()

    def discard_staged(self) -> None:
        """Delete staged outputs not published; another attempt's files are never touched."""
        for files in self.staged:
            files.discard()

    def report(self, stage: str, step: int = 0, total_steps: int = 0, **extra: Any) -> None:
        """Record progress (written by the lease keeper, at most once per interval) and check for stops."""
        percent = round(100.0 * step / total_steps, 1) if total_steps else None
        progress = {"stage": stage, "step": step, "total_steps": total_steps, "percent": percent, **extra}
        self.events.progress(self.task, progress)  # adds eta_seconds / vram_gb; in memory only
        self.travel_eta = progress.get("travel_eta_seconds", self.travel_eta)
        if self.on_activity is not None:
            self.on_activity()
        self.lease.set_progress(progress)
        self.check()

    def report_parent(self, progress: dict[str, Any]) -> None:
        """Record the progress of this task's orchestrator (segments done + this segment's step)."""
        if self.task.parent_task_id:
            if self.travel_eta is not None:  # the orchestrator's remaining: this segment, later ones, the stitch
                progress = {**progress, "eta_seconds": self.travel_eta}
            self.lease.set_parent_progress(self.task.parent_task_id, progress)

    def check(self) -> None:
        """Raise if the task must stop now: cancelled, lease lost, or shutdown abort."""
        if self.lease.lost.is_set():
            if self.lease.lost_status is TaskStatus.CANCELLED:
                raise TaskCancelled(f"task {self.task.id} was cancelled")
            raise LeaseLost(f"task {self.task.id} is no longer held by this worker ({self.lease.lost_status})")
        if self.abort.is_set():
            raise ShutdownAbort("second stop signal: abandoning the task")


class ClaimRule(Protocol):
    """Plain-data claim filter (worker.tasks.claim_filter): pure functions of a row, safe inside a claim."""

    def __call__(self, task: Task) -> bool: ...
    def model_of(self, task: Task) -> str | None: ...


class TaskRunner(Protocol):
    """Executes tasks; owns the resident model (worker.tasks.runner.GenerationRunner)."""

    claim_filter: ClaimRule

    def resident_model(self) -> str | None: ...
    def device_name(self) -> str | None: ...
    def run(self, task: Task, context: RunContext) -> TaskOutcome | TaskDeferred | PendingFinish: ...


RunResult = TaskOutcome | TaskDeferred | PendingFinish


class Worker:
    """Claims and executes tasks until asked to stop. `request_stop` is safe from a signal handler."""

    def __init__(
        self,
        repository: TaskRepository,
        runner: TaskRunner,
        settings: WorkerSettings,
        policy: RetryPolicy | None = None,
        affinity: ModelAffinity | None = None,
        events: EventSink | None = None,
        overlap_outputs: bool = True,
    ) -> None:
        self.repository = repository
        self.events = events or NULL_SINK  # live progress: ETA, monitoring, WebSocket events (worker.live.events)
        self.runner = runner
        self.settings = settings
        self.policy = policy or RetryPolicy()
        self.affinity = affinity or ModelAffinity()
        self.stop_requested = threading.Event()
        self.abort_requested = threading.Event()
        self.current_task: Task | None = None  # the task this loop runs (see `finishing_task` too)
        # Finishes outputs while the next task runs (issue 15); None: every output is written in the run.
        self.finisher = OutputFinisher(f"finisher-{settings.worker_id}") if overlap_outputs else None
        self._status_lock = threading.Lock()  # the `workers` row's busy/idle, written from both threads
        self.executed = 0
        self._next_sweep = 0.0
        self._log_extra = {"worker_id": settings.worker_id}
        self._last_activity = time.monotonic()

    # ---- control ----------------------------------------------------------------------------------

    @property
    def finishing_task(self) -> Task | None:
        """The task whose output the finisher is writing (In Progress, still ours), or None."""
        return self.finisher.pending if self.finisher is not None else None

    def request_stop(self) -> None:
        """First call: finish the current task (and a pending output), then exit. Second call: abandon
        them (re-queued, their staged files discarded)."""
        if self.stop_requested.is_set():
            self.abort_requested.set()
        self.stop_requested.set()

    # ---- the loop -----------------------------------------------------------------------------------

    def run_forever(self, until_idle: bool = False) -> None:
        """Serve tasks until stopped (or, with until_idle, until no task is ready and no output is pending).
        It returns only once a pending output is persisted (or, after a second stop, released)."""
        gpu = self.runner.device_name()
        self._with_db_retry(lambda: self.repository.register_worker(self.settings.worker_id, gpu))
        log.info("worker started", extra=self._log_extra)
        try:
            while not self.stop_requested.is_set():
                self._note_activity()
                ran = self.run_once()
                if not ran:
                    if until_idle:
                        if self._drain_finisher():
                            continue  # its task completed: a dependant of it may be ready now
                        break
                    self.stop_requested.wait(self.settings.poll_interval_s)
        finally:
            self._drain_finisher()  # a first stop still lets the pending output finish (an abort releases it)
            self._best_effort(lambda: self.repository.update_worker(self.settings.worker_id, "stopped", None))
            log.info("worker stopped after %d task(s)", self.executed, extra=self._log_extra)

    def _note_activity(self) -> None:
        self._last_activity = time.monotonic()

    def seconds_since_activity(self) -> float:
        """Seconds since the loop last showed life: a loop iteration, or a progress report of a task it runs
        (a step, a stage, a frame written). /healthz reports a loop silent for too long as stalled."""
        return time.monotonic() - self._last_activity

    def _drain_finisher(self) -> bool:
        """Wait for the pending output (if any) to be finished and persisted; True when there was one."""
        if self.finisher is None or self.finisher.pending is None:
            return False
        self.finisher.wait_idle()
        return True

    def run_once(self) -> bool:
        """Sweep if due, claim one task and execute it. False when nothing was ready."""
        self._sweep_if_due()
        self._finish_awaited_output()
        # Everything the claim needs is read now, as plain data: nothing calls back into the runner (or
        # preset / model code) while the claim transaction holds its lock.
        rule = self.runner.claim_filter
        resident = self.runner.resident_model()

        def choose(candidates: list[Task]) -> Task | None:
            return self.affinity.choose(candidates, resident, rule.model_of)

        try:
            task = self.repository.claim_next(self.settings.worker_id, self.settings.lease_s, choose, accept=rule)
        except SQLAlchemyError as exc:
            log.warning("claim failed, database unreachable? %s", exc.__class__.__name__, extra=self._log_extra)
            self.stop_requested.wait(self._backoff())
            return True
        self._db_failures = 0
        if task is None:
            return False
        self._execute(task)
        return True

    def _finish_awaited_output(self) -> None:
        """Wait for the pending output first when a queued task waits for it (a travel orchestrator for its
        stitch, a user's `dependant_on` chain): claiming something else now would make that task wait a whole
        task longer, or switch models twice."""
        pending = self.finishing_task
        if pending is None:
            return
        try:
            awaited = self.repository.has_queued_dependant(pending.id)
        except SQLAlchemyError:
            return  # the claim that follows meets the outage and backs off
        if awaited:
            self._drain_finisher()

    def _sweep_if_due(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        # A short lease (tests, impatient users) gets a sweep at least twice per lease.
        interval = min(self.settings.stale_sweep_interval_s, self.settings.lease_s / 2)
        self._next_sweep = time.monotonic() + interval
        try:
            recovered = self.repository.requeue_stale()
            blocked = self.repository.fail_blocked()
        except SQLAlchemyError as exc:
            log.warning("stale sweep failed: %s", exc.__class__.__name__, extra=self._log_extra)
            return
        for task_id in recovered.requeued:
            log.warning("re-queued task whose lease expired", extra={**self._log_extra, "task_id": task_id})
        for task_id in recovered.failed:
            log.error("failed task that exhausted its attempts", extra={**self._log_extra, "task_id": task_id})
        for task_id in blocked:
            log.info("ended task blocked by its prerequisite or parent", extra={**self._log_extra, "task_id": task_id})

    # ---- one task -----------------------------------------------------------------------------------

    def _execute(self, task: Task) -> None:
        extra = {**self._log_extra, "task_id": task.id, "attempt": task.attempts}
        log.info("claimed %s task (priority %d)", task.task_type, task.priority, extra=extra)
        self.current_task = task
        lease = LeaseKeeper(
            self.repository,
            task.id,
            self.settings.worker_id,
            self.settings.lease_s,
            self.settings.heartbeat_interval_s,
        ).start()
        self._set_status("busy")
        self.events.started(task, self.runner.resident_model())
        context = RunContext(
            task,
            self.settings.worker_id,
            lease,
            self.abort_requested,
            self.events,
            can_defer=self.finisher is not None,
            on_activity=self._note_activity,
        )
        handed_off = False
        try:
            handed_off = self._settle(task, lease, context, extra, lambda: self.runner.run(task, context))
        finally:
            if not handed_off:
                _end_attempt(context, lease)
            self.current_task = None
            self.executed += 1
            self._set_status("idle")

    def _settle(
        self,
        task: Task,
        lease: LeaseKeeper,
        context: RunContext,
        extra: dict[str, Any],
        produce: Callable[[], RunResult],
        result_extras: dict[str, Any] | None = None,
    ) -> bool:
        """Run `produce` (the run, or a pending run's finish) and persist how it ended, one `except` per way
        out. True when it returned a `PendingFinish` that went to the finisher (which then owns the attempt)."""
        try:
            outcome = produce()
        except TaskCancelled:
            self.events.cancelled(task)
            log.info("task cancelled; stopped at %s", _progress_text(task, lease), extra=extra)
        except LeaseLost as exc:
            log.warning("%s; result discarded", exc, extra=extra)
        except ShutdownAbort:
            released = self._with_db_retry(lambda: self.repository.release(task.id, self.settings.worker_id))
            log.warning("shutdown abort: task re-queued" if released else "shutdown abort", extra=extra)
        except Exception as exc:
            self._persist_failure(task, exc, extra)
        else:
            if isinstance(outcome, PendingFinish) and result_extras is not None:  # a finish's own result
                self._persist_failure(task, TypeError("an output finish returned another PendingFinish"), extra)
            elif isinstance(outcome, PendingFinish):
                return self._hand_off(task, lease, context, extra, outcome)
            elif isinstance(outcome, TaskDeferred):
                self._persist_deferral(task, outcome, extra)
            else:
                self._persist_success(task, lease, outcome, extra, context, result_extras)
        return False

    def _hand_off(
        self, task: Task, lease: LeaseKeeper, context: RunContext, extra: dict[str, Any], pending: PendingFinish
    ) -> bool:
        """Give a finished run's output stage to the finisher thread; True (it now owns the attempt).

        Waits first while the previous task's output is still being finished (at most one pending)."""
        # Monitor / ETA extras close with the GPU work, on this thread: the next task opens its own window.
        result_extras = self.events.result_extras(task)
        if self.finisher is None:  # a runner that defers without being allowed to: finish here
            self._settle(task, lease, context, extra, pending.finish, result_extras)
            return False

        def job() -> None:
            try:
                self._settle(task, lease, context, extra, pending.finish, result_extras)
            finally:
                _end_attempt(context, lease)  # its staged file discarded unless published, its lease keeper stopped
                self._set_status("idle", finishing_done=True)

        log.info("output of %s task handed to the finisher", task.task_type, extra=extra)
        self.finisher.submit(task, job)
        return True

    def _set_status(self, status: str, finishing_done: bool = False) -> None:
        """The `workers` row: busy while the loop runs a task or the finisher holds one, idle otherwise."""
        with self._status_lock:
            if status == "idle":
                pending = self.finisher.pending if self.finisher is not None else None
                # The finisher's own job is still its pending task while it calls this.
                busy = self.current_task is not None or (pending is not None and not finishing_done)
                if busy:
                    return
            self._best_effort(
                lambda: self.repository.update_worker(self.settings.worker_id, status, self.runner.resident_model())
            )

    def _persist_success(
        self,
        task: Task,
        lease: LeaseKeeper,
        outcome: TaskOutcome,
        extra: dict[str, Any],
        context: RunContext | None = None,
        result_extras: dict[str, Any] | None = None,
    ) -> None:
        lease.flush()
        extras = self.events.result_extras(task) if result_extras is None else result_extras
        result = {**outcome.result_data, **extras}
        worker_id = self.settings.worker_id
        staged = context is not None and bool(context.staged)

        def complete() -> bool:
            if context is not None and staged:
                # The rename happens inside the guarded write: only the claim holder ever publishes.
                return self.repository.mark_complete(
                    task.id, worker_id, outcome.output_location, result, publish=context.publish_staged
                )
            return self.repository.mark_complete(task.id, worker_id, outcome.output_location, result)

        try:
            done = self._with_db_retry(complete)
        except OSError as exc:  # the staged file could not be renamed: nothing was written, the attempt failed
            self._persist_failure(task, exc, extra)
            return
        if done:
            log.info("task complete: %s", outcome.output_location, extra=extra)
            self.events.completed(task, outcome.output_location, result)
            return
        if done is None:
            # Database unreachable for a whole lease: the row will be re-queued by a stale sweep.
            kept = "output discarded" if staged else "output kept"
            log.error("could not record the result; %s: %s", kept, outcome.output_location, extra=extra)
            return
        # Cancelled (or taken over) while finishing. A staged output was never published (the finally of
        # `_execute` deletes it), so the final name, perhaps another attempt's output, is left untouched.
        status = self._with_db_retry(lambda: self.repository.get_status(task.id))
        if status is TaskStatus.CANCELLED and outcome.output_location and not staged:
            Path(outcome.output_location).unlink(missing_ok=True)  # an unstaged output must not outlive the cancel
        if status is TaskStatus.CANCELLED:
            self.events.cancelled(task)
        log.info("task ended %s before its result was recorded; output discarded", status, extra=extra)

    def _persist_deferral(self, task: Task, deferral: TaskDeferred, extra: dict[str, Any]) -> None:
        worker_id = self.settings.worker_id
        self._with_db_retry(lambda: self.repository.defer(task.id, worker_id, deferral.wait_for, deferral.progress))
        log.info("task waits for %s", deferral.wait_for, extra=extra)

    def _persist_failure(self, task: Task, exc: Exception, extra: dict[str, Any]) -> None:
        decision = self.policy.decide(exc, task)
        worker_id = self.settings.worker_id
        if decision.retry:
            log.warning(decision.message, extra=extra, exc_info=not _is_expected(exc))
            self._with_db_retry(
                lambda: self.repository.retry_later(task.id, worker_id, decision.message, decision.delay_s)
            )
        else:
            log.error("task failed: %s", decision.message, extra=extra, exc_info=not _is_expected(exc))
            self._with_db_retry(lambda: self.repository.mark_failed(task.id, worker_id, decision.message))
        self.events.failed(task, exc, decision.message, decision.retry)

    # ---- database resilience ------------------------------------------------------------------------

    _db_failures = 0

    def _backoff(self) -> float:
        self._db_failures += 1
        return min(DB_RETRY_MAX_S, 0.5 * 2 ** min(self._db_failures, 8)) * random.uniform(0.8, 1.2)

    def _with_db_retry(self, operation: Callable[[], T]) -> T | None:
        """Retry a write while the database is unreachable, up to one lease (after that the row is
        re-queued by someone else's sweep anyway, so giving up loses nothing)."""
        deadline = time.monotonic() + self.settings.lease_s
        while True:
            try:
                result = operation()
                self._db_failures = 0
                return result
            except SQLAlchemyError as exc:
                if time.monotonic() > deadline:
                    log.error("database unreachable, giving up on a write: %s", describe(exc), extra=self._log_extra)
                    return None
                log.warning("database write failed, retrying: %s", exc.__class__.__name__, extra=self._log_extra)
                time.sleep(self._backoff())

    def _best_effort(self, operation: Callable[[], object]) -> None:
        try:
            operation()
        except SQLAlchemyError as exc:
            log.debug("best-effort write skipped: %s", exc.__class__.__name__, extra=self._log_extra)


def _end_attempt(context: RunContext, lease: LeaseKeeper) -> None:
    """Cleanup of every ending: a lost claim, a failure or an abort leaves no staged file behind."""
    context.discard_staged()
    lease.stop()


def _is_expected(exc: BaseException) -> bool:
    return bool(getattr(exc, "permanent", False)) or isinstance(exc, ValueError)


def _progress_text(task: Task, lease: LeaseKeeper) -> str:
    progress = lease.progress or {}
    return f"stage {progress.get('stage', 'start')} step {progress.get('step', 0)}/{progress.get('total_steps', 0)}"
