"""The lease keeper: a background thread that renews a running task's lease, writes its progress
(at most once per interval, never from the step loop) and notices a user's cancel."""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from worker.store.repository import TaskRepository
from worker.task import TaskStatus

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Keeps one claimed task alive; `lost` is set when the row is no longer ours (cancel, expiry)."""

    def __init__(
        self, repository: TaskRepository, task_id: str, worker_id: str, lease_s: float, interval_s: float
    ) -> None:
        self._repository = repository
        self._task_id = task_id
        self._worker_id = worker_id
        self._lease_s = lease_s
        self._interval_s = interval_s
        self._progress: dict[str, Any] | None = None
        self._written: dict[str, Any] | None = None
        self._parent: tuple[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.lost = threading.Event()
        self.lost_status: TaskStatus | None = None
        self._thread = threading.Thread(target=self._run, name=f"lease-{task_id[:8]}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def progress(self) -> dict[str, Any] | None:
        """The latest progress reported by the runner."""
        with self._lock:
            return self._progress

    def set_progress(self, progress: dict[str, Any]) -> None:
        """Called from the step loop: only stores the value (no I/O)."""
        with self._lock:
            self._progress = progress

    def set_parent_progress(self, parent_id: str, progress: dict[str, Any]) -> None:
        """Progress of the orchestrator this task belongs to (written with the next beat)."""
        with self._lock:
            self._parent = (parent_id, progress)

    def flush(self) -> None:
        """Write the latest progress now (used before the final status write)."""
        self._beat()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._beat()

    def _beat(self) -> None:
        with self._lock:
            progress = self._progress if self._progress is not self._written else None
            parent, self._parent = self._parent, None
        try:
            if parent is not None:
                self._repository.set_progress(*parent)
            alive = self._repository.heartbeat(self._task_id, self._worker_id, self._lease_s, progress)
            if not alive and not self.lost.is_set():
                self.lost_status = self._repository.get_status(self._task_id)
                self.lost.set()
                log.info(
                    "task is no longer ours (status %s)",
                    self.lost_status.value if self.lost_status else "deleted",
                    extra={"task_id": self._task_id, "worker_id": self._worker_id},
                )
            elif alive:
                self._written = progress if progress is not None else self._written
        except SQLAlchemyError as exc:
            # The database may be restarting: keep generating, try again next beat (the lease is long).
            log.warning("heartbeat failed: %s", exc.__class__.__name__, extra={"task_id": self._task_id})
