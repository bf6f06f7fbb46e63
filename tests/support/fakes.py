"""A base for fake task runners: the `worker.loop.worker.TaskRunner` protocol boilerplate.

Subclasses implement `run`; `resident` (class or instance attribute) is what `resident_model()` reports.
"""

from __future__ import annotations

from worker.loop.worker import RunContext
from worker.task import Task, TaskDeferred, TaskOutcome
from worker.tasks.claim_filter import ClaimFilter


class BaseFakeRunner:
    """Claims anything a one-GPU worker may claim, reports `resident` as its model and no GPU."""

    claim_filter: ClaimFilter = ClaimFilter()
    resident: str | None = None

    def resident_model(self) -> str | None:
        return self.resident

    def device_name(self) -> str | None:
        return None

    def run(self, task: Task, context: RunContext) -> TaskOutcome | TaskDeferred:
        raise NotImplementedError
