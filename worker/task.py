"""Value types passed between the repository, the worker loop and the runner (never ORM rows)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class TaskStatus(str, enum.Enum):
    """The life cycle of a row in `tasks` (docs/DESIGN.md)."""

    QUEUED = "Queued"
    IN_PROGRESS = "In Progress"
    COMPLETE = "Complete"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def is_final(self) -> bool:
        return self in (TaskStatus.COMPLETE, TaskStatus.FAILED, TaskStatus.CANCELLED)


FINAL_STATUSES = tuple(s.value for s in TaskStatus if s.is_final)


def output_file(output_location: str | None, result_data: dict[str, Any] | None) -> str | None:
    """A row's output as an absolute path. `output_location` holds it, except on a Headless-Wan2GP table where
    it holds HW's relative `files/<name>` form and `result_data.output_file` the path (worker.store.db)."""
    path = (result_data or {}).get("output_file")
    return path if isinstance(path, str) else output_location


@dataclass(frozen=True)
class Task:
    """One row of `tasks`, as read by a worker. `params_text` is kept raw: validation happens later."""

    id: str
    task_type: str
    params_text: str
    status: TaskStatus
    priority: int = 0
    dependant_on: str | None = None
    parent_task_id: str | None = None
    attempts: int = 0
    max_attempts: int = 3
    worker_id: str | None = None
    output_location: str | None = None
    result_data: dict[str, Any] | None = None
    error_message: str | None = None
    progress: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    generation_started_at: datetime | None = None
    generation_processed_at: datetime | None = None
    lease_expires_at: datetime | None = None
    run_after: datetime | None = None

    @property
    def output_file(self) -> str | None:
        return output_file(self.output_location, self.result_data)


@dataclass(frozen=True)
class NewTask:
    """What a submitter provides; everything else gets a database default."""

    task_type: str
    params: dict[str, Any]
    id: str | None = None
    priority: int = 0
    dependant_on: str | None = None
    parent_task_id: str | None = None
    max_attempts: int = 3


@dataclass(frozen=True)
class TaskOutcome:
    """A successful execution: the final file and the JSON result_data."""

    output_location: str | None
    result_data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskDeferred:
    """The task must wait for another one first (an orchestrator for its last child); not an attempt."""

    wait_for: str
    progress: dict[str, Any] | None = None
