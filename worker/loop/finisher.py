"""The output finisher: one background thread that finishes a task's output while the loop runs the next task.

A generation's GPU part (denoise, VAE decode) runs on the loop's thread; its MP4 encode and write (CPU work,
issue 15) can run here instead, so the loop claims and starts the next task meanwhile. A runner asks for it by
returning a `PendingFinish` (only when `RunContext.can_defer`); the loop wraps it in a job that writes the file
under its staged name and persists the outcome exactly as the loop would have (worker.loop.worker).

At most one job is pending or running: `submit` waits for the previous one first, which bounds host memory to
one finished video's frames besides the running task's. The finisher never persists anything itself and never
dies of a job's exception (the job handles its own; anything escaping is logged).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from worker.task import Task, TaskOutcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingFinish:
    """A run whose GPU work is over: `finish()` writes its output (staged) and returns the outcome.

    `finish` runs on the finisher thread, while the task still holds its claim and its lease keeper beats;
    it may raise what a run raises (a cancel, an encode error) with the same meaning.
    """

    finish: Callable[[], TaskOutcome]


class OutputFinisher:
    """One worker thread running finish jobs one at a time, with at most one job in hand."""

    def __init__(self, name: str = "output-finisher") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._job: Callable[[], None] | None = None
        self._task: Task | None = None  # whose job is queued or running
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> Task | None:
        """The task whose output is being finished (queued or running), None when idle."""
        with self._cond:
            return self._task

    def submit(self, task: Task, job: Callable[[], None]) -> None:
        """Run `job` on the finisher thread; first waits until the previous job is done (backpressure)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the output finisher is closed")
            self._cond.wait_for(lambda: self._task is None)
            self._job, self._task = job, task
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running; False when `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._task is None, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Let the job in hand finish, then end the thread; False when it still runs after `timeout`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._job is not None or self._closed)
                job, task = self._job, self._task
                if job is None:  # closed and nothing in hand
                    return
            try:
                job()
            except BaseException:  # a job persists its own outcome; this thread must outlive a bug in one
                log.exception("output finisher job failed", extra={"task_id": task.id if task else None})
            finally:
                with self._cond:
                    self._job, self._task = None, None
                    self._cond.notify_all()
